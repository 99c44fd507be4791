"""Auditable toxicity classification from SAE features (Qwen-Scope report, section 5): rules mined from which
features fire more often on toxic than on clean text (saescope.api.rules), applied as an OR over a few (layer,
feature) pairs, every positive naming the features and tokens that decided it."""

from saescope.apps.toxicity.classify import AuditLog, Decision, RuleClassifier
from saescope.apps.toxicity.evaluate import BenchConfig, benchmark, lexical_baseline, residual_probe, transfer_matrix
from saescope.apps.toxicity.run import (
    ClassifyConfig,
    MineConfig,
    RulesEvalConfig,
    mining_side,
    run_classify,
    run_mine,
    run_rules_eval,
)

__all__ = ["AuditLog", "BenchConfig", "ClassifyConfig", "Decision", "MineConfig", "RuleClassifier", "RulesEvalConfig",
           "benchmark", "lexical_baseline", "mining_side", "residual_probe", "run_classify", "run_mine", "run_rules_eval",
           "transfer_matrix"]
