"""`saescope train | plan | models`: training runs, their resource plans, and the built-in models and corpus."""

from __future__ import annotations

import argparse
from dataclasses import fields

from saescope.cli.flags import Command, config_from_flags
from saescope.core.train import TrainConfig, TrainLaunch, run_train
from saescope.core.train.plan import PlanConfig, run_plan
from saescope.core.train.run import ModelsConfig, run_models


def cmd_train(a: argparse.Namespace) -> None:
    """A new run from the flags, or the run in --out resumed with the flags typed (TrainConfig.resumed); several seeds
    go to the trust application; --eval-tokens evaluates the SAEs just trained on the model already loaded."""
    launch = config_from_flags(TrainLaunch, a)
    typed = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if f.name in a.given and f.name != "out"}
    if launch.seeds > 1:  # each seed's folder is a run of its own, resumed on its own
        from saescope.apps.trust import SeedsConfig, run_seeds

        print(run_seeds(SeedsConfig(train=config_from_flags(TrainConfig, a), seeds=launch.seeds, resume=launch.resume,
                                    eval_tokens=launch.eval_tokens, typed=typed)).text())
        return
    cfg = TrainConfig.resumed(a.out, **typed) if launch.resume else config_from_flags(TrainConfig, a)
    result = run_train(cfg, resume=launch.resume, distributed=launch.distributed)
    print(result.text())
    if launch.eval_tokens and result.rank == 0:
        from saescope.api.evaluate import EvalConfig, run_eval
        from saescope.api.scope import Scope

        settings = EvalConfig(sae=cfg.out, data=cfg.data, text_column=cfg.text_column, n_tokens=launch.eval_tokens,
                              ctx_len=cfg.ctx_len, outlier_factor=cfg.outlier_factor)
        print(run_eval(settings, scope=Scope(result.lm, result.saes)).text())


COMMANDS = {
    "train": Command(TrainConfig, run_train, "train one top-k SAE per decoder layer", launch=TrainLaunch, handler=cmd_train),
    "plan": Command(PlanConfig, run_plan, "memory and time estimates for training all layers of a model"),
    "models": Command(ModelsConfig, run_models, "built-in models, the default corpus, and where they are cached"),
}
