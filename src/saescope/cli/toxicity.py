"""`saescope toxicity mine | classify | eval`: auditable toxicity rules from SAE features (saescope.apps.toxicity)."""

from saescope.apps.toxicity import ClassifyConfig, MineConfig, RulesEvalConfig, run_classify, run_mine, run_rules_eval
from saescope.cli.flags import Command, Group

COMMANDS = {"toxicity": Group("toxicity rules from SAE features: mine, classify with an audit log, evaluate", {
    "mine": Command(MineConfig, run_mine, "rank features by P(fire | toxic) - P(fire | clean) and write the top-K rules"),
    "classify": Command(ClassifyConfig, run_classify, "apply a rule to texts; one audit record per decision"),
    "eval": Command(RulesEvalConfig, run_rules_eval, "F1 per language and functionality, beside the control, a residual "
                    "probe and a lexical baseline; F1 against mining fraction; the transfer matrix"),
})}
