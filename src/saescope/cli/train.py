"""`saescope train | plan | models`: training runs, their resource plans, and the built-in models and corpus."""

from __future__ import annotations

import argparse
from dataclasses import fields

from saescope.api.sweep import SweepConfig, run_sweep
from saescope.cli.flags import Command, config_from_flags
from saescope.core.activation_cache import CacheConfig, run_cache
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
        # trained from cached activations, no LM was loaded: the evaluation loads the one the SAEs name
        print(run_eval(settings, scope=Scope(result.lm, result.saes) if result.lm is not None else None).text())


COMMANDS = {
    "train": Command(TrainConfig, run_train, "train one SAE per decoder layer (top-k, BatchTopK, JumpReLU or Matryoshka), "
                     "from the LM or from cached activations", launch=TrainLaunch, handler=cmd_train),
    "cache": Command(CacheConfig, run_cache, "write a model's residual activations at some layers to disk, to train "
                     "many SAEs from (train --activations, sweep)"),
    "sweep": Command(SweepConfig, run_sweep, "train SAEs of several kinds and k from one activation cache, evaluate "
                     "them beside random controls, and compare them in one table and plot"),
    "plan": Command(PlanConfig, run_plan, "memory and time estimates for training all layers of a model"),
    "models": Command(ModelsConfig, run_models, "built-in models, the default corpus, and where they are cached"),
}
