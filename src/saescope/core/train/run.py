"""`saescope train`: a run from its config, started fresh or resumed, and what it reports.

    from saescope.core.train import TrainConfig, run_train
    result = run_train(TrainConfig(preset="8x-k32", max_tokens=131_072, out="runs/x"))
    result = run_train(TrainConfig.resumed("runs/x", max_tokens=262_144), resume=True)   # after a kill, or to go on
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from saescope.core.errors import ParamError
from saescope.core.io import RunDir
from saescope.core.models import LoadedModel
from saescope.core.schema import Config, config_field, escape
from saescope.core.train.config import TrainConfig
from saescope.core.train.trainer import Trainer

DISTRIBUTED = ("dp", "layers")


@dataclass(kw_only=True)
class TrainLaunch(Config):
    """How a run is launched, beside what it trains (TrainConfig, saved in train.json): not saved with the run."""

    resume: bool = config_field(False, "continue the run in --out from its latest checkpoint")
    distributed: str | None = config_field(None, "under torchrun: split the data (dp) or the layers", choices=DISTRIBUTED)
    seeds: int = config_field(1, "train N SAE sets with seeds seed..seed+N-1 on the same data (OUT/seed-i) and compare them",
                              min=1)
    eval_tokens: int = config_field(0, "evaluate on this many held-out tokens afterwards", min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seeds > 1 and self.distributed:
            raise ParamError("{} trains the runs one after the other in one process; leave out {}", "seeds", "distributed")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.distributed:
            raise ParamError("launched by torchrun with several processes: give {} dp or layers", "distributed")


@dataclass
class TrainResult:
    """A finished run: its config as trained, the summary written to train_summary.json, the step it resumed from
    (None for a fresh start), and the trainer's model and SAEs (for an evaluation that follows)."""

    cfg: TrainConfig
    summary: dict
    resumed_from: int | None
    rank: int
    lm: LoadedModel = field(repr=False)
    saes: dict = field(repr=False)
    d_sae: int = 0
    k: int = 0

    def text(self) -> str:
        if self.rank != 0:
            return ""
        s = self.summary
        dropped = ", ".join(f"{n}:{v['dropped']}" for n, v in s["layers"].items())
        return "\n".join([
            *([f"resumed {self.cfg.out} at step {self.resumed_from}"] if self.resumed_from is not None else []),
            f"trained {len(self.saes)} {self.cfg.arch} SAEs (d_sae {self.d_sae}, k {self.k}) on {s['tokens']} tokens in "
            f"{s['elapsed_s']:.0f}s ({s['tokens_per_s']:.0f} tok/s, "
            + (f"from {self.cfg.activations}" if self.cfg.activations else f"LM in {s['model_dtype']}") + f"); SAEs in {self.cfg.out}",
            f"outlier filter dropped tokens per layer: {dropped}"])


def run_train(cfg: TrainConfig, *, resume: bool = False, distributed: str | None = None,
              lm: LoadedModel | None = None) -> TrainResult:
    """Train the run of `cfg` (resumed from its latest checkpoint with `resume`; build that config with
    TrainConfig.resumed). A folder that already holds a run is never started over."""
    run = RunDir(cfg.out)
    if not resume and run.has_run():
        raise ParamError(f"{escape(str(run.path))} already holds a run; give {{}} to continue it or choose another {{}}",
                         "resume", "out")
    trainer = Trainer(cfg, distributed=distributed, lm=lm)
    resumed_from = trainer.step if resume and trainer.load_checkpoint() else None
    summary = trainer.fit()
    return TrainResult(trainer.cfg, summary, resumed_from, trainer.dist.rank, trainer.lm,
                       {n: st.sae for n, st in trainer.states.items()}, trainer.d_sae, trainer.k)


@dataclass(kw_only=True)
class ModelsConfig(Config):
    """`saescope models`: the built-in models and the default corpus training reads, and where they are cached."""


@dataclass
class ModelsResult:
    lines: list[str]

    def text(self) -> str:
        return "\n".join(self.lines)


def run_models(cfg: ModelsConfig) -> ModelsResult:
    from saescope.core.cache import cache_dir
    from saescope.core.data.corpus import MIX_SHARES, mix_file
    from saescope.core.models import BUILTIN_MODELS

    lines = [f"cache: {cache_dir()}  (set SAESCOPE_CACHE to move it)"]
    for name, spec in BUILTIN_MODELS.items():
        folder = cache_dir() / "models" / name
        state = str(folder) if (folder / "config.json").exists() else "not fetched yet"
        lines += [f"  {name:24} {state}", f"  {'':24} {spec.description}"]
    corpus = mix_file()
    mix = ", ".join(f"{name} {share:.0%}" for name, share in MIX_SHARES.items())
    lines.append(f"default corpus: {corpus if corpus.exists() else 'not built yet'} ({mix}; saescope.core.data.corpus)")
    return ModelsResult(lines)
