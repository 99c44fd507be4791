"""The trust checks as commands: `saescope stability` (two SAE sets of the same layers matched feature by feature),
`saescope train --seeds N` (N seeds of one run, each compared with the first), `saescope transfer` (SAEs applied to
another checkpoint). Each is a config and a run_* returning a result that writes its JSON and prints its table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saescope.api.controls import ControlOption
from saescope.api.evaluate import EvalConfig, run_eval
from saescope.api.scope import SAE_HELP, Scope, model_of
from saescope.apps.trust.seeds import seed_configs, stability_between, train_seeds
from saescope.apps.trust.stability import format_stability
from saescope.apps.trust.transfer import format_transfer, transfer_report
from saescope.core.errors import ParamError
from saescope.core.files import atomic_write_json
from saescope.core.io import K_HELP, RunDir, load_saes
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption
from saescope.core.models import load_model
from saescope.core.schema import REQUIRED, Config, config_field
from saescope.core.train import TrainConfig, TrainResult


@dataclass(kw_only=True)
class StabilityConfig(LayersOption, ControlOption):
    """`saescope stability`: match the features of two SAE sets of the same layers (seeds, data order)."""

    sae: list[str] = config_field(REQUIRED, SAE_HELP + "; give it twice: --sae A --sae B", repeat=True)
    model: str | None = config_field(None, "for activation correlations (default: A's model)")
    data: str | None = config_field(None, "text for activation correlations (default: the embedded corpus's held-out split)")
    text_column: str = config_field("text", "for tables and JSON: the text column")
    n_tokens: int = config_field(16384, "tokens for activation correlations; 0 = decoders only", min=0)
    k: int | None = config_field(None, K_HELP, min=1)
    out: str | None = config_field(None, "JSON results (default: A/trust/stability.json)", output="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.sae) != 2:
            raise ParamError(f"give exactly two SAE sets ({{}} A {{}} B), got {len(self.sae)}", "sae", "sae")

    def output(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae[0]).trust / "stability.json"

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class StabilityResult:
    path: Path
    result: dict

    def text(self) -> str:
        return f"{format_stability(self.result['layers'], self.result['control'])}\nstability results: {self.path}"


@holding_lock
def run_stability(cfg: StabilityConfig) -> StabilityResult:
    saes_a = load_saes(cfg.sae[0], layers=cfg.layer_list(), k=cfg.k)
    saes_b = load_saes(cfg.sae[1], layers=cfg.layer_list(), k=cfg.k)
    shared = {n: saes_a[n] for n in saes_a if n in saes_b}
    control = cfg.load_control(shared) if shared else None
    lm = Scope(load_model(model_of(saes_a, cfg.model, cfg.sae[0]), dtype="fp32"), shared).lm if cfg.n_tokens > 0 else None
    out = cfg.output()
    result = stability_between(saes_a, saes_b, lm, out, data=cfg.data, text_column=cfg.text_column, n_tokens=cfg.n_tokens,
                               control=control, labels=(cfg.sae[0], cfg.sae[1]))
    return StabilityResult(out, result)


@dataclass(kw_only=True)
class TransferConfig(LayersOption):
    """`saescope transfer`: the SAEs on another checkpoint beside their own model, on the same held-out text."""

    sae: str = config_field(REQUIRED, SAE_HELP)
    model: str = config_field(REQUIRED, "the other checkpoint (folder, built-in name or hub id)")
    source_model: str | None = config_field(None, "the SAEs' own model (default: the one their config names)")
    data: str | None = config_field(None, "held-out text (default: the embedded corpus's held-out split)")
    text_column: str = config_field("text", "for tables and JSON: the text column")
    n_tokens: int = config_field(4096, "held-out tokens", min=1)
    ctx_len: int = config_field(256, "tokens per sequence", min=2)
    k: int | None = config_field(None, K_HELP, min=1)
    out: str | None = config_field(None, "JSON results (default: SAE/trust/transfer.json)", output="file")

    def output(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).trust / "transfer.json"

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class TransferResult:
    path: Path
    report: dict

    def text(self) -> str:
        return f"{format_transfer(self.report)}\ntransfer results: {self.path}"


@holding_lock
def run_transfer(cfg: TransferConfig) -> TransferResult:
    saes = load_saes(cfg.sae, layers=cfg.layer_list(), k=cfg.k)
    source = load_model(model_of(saes, cfg.source_model, cfg.sae), dtype="fp32")
    target = load_model(cfg.model, dtype="fp32")
    report = transfer_report(saes, source, target, data=cfg.data, text_column=cfg.text_column, n_tokens=cfg.n_tokens,
                             ctx_len=cfg.ctx_len)
    out = cfg.output()
    atomic_write_json(out, report)
    return TransferResult(out, report)


@dataclass(kw_only=True)
class SeedsConfig(Config):
    """`saescope train --seeds N`: N runs of `train` with seeds seed..seed+N-1 on the same data (OUT/seed-S), each
    compared with the first beside a random control. `typed`: the training fields given explicitly, which a resumed
    run checks against each run's own train.json (TrainConfig.resumed)."""

    train: TrainConfig
    seeds: int = config_field(2, "the number of seeds", min=2)
    resume: bool = config_field(False, "continue each run from its latest checkpoint")
    eval_tokens: int = config_field(0, "evaluate each run on this many held-out tokens afterwards", min=0)
    n_tokens: int = config_field(16384, "tokens for the activation correlations", min=0)
    typed: dict = field(default_factory=dict)


@dataclass
class SeedsResult:
    runs: list[str]
    stability: dict[str, dict]

    def text(self) -> str:
        return "\n".join(self.runs + [f"{format_stability(r['layers'], r['control'])}\nstability results: {r['path']}"
                                      for r in self.stability.values()])


def run_seeds(cfg: SeedsConfig) -> SeedsResult:
    configs = seed_configs(cfg.train, cfg.seeds)
    if cfg.resume:  # each run resumed from its own folder, with the flags typed checked against its own record
        configs = [TrainConfig.resumed(c.out, **{**cfg.typed, **{k: getattr(c, k) for k in ("seed", "data_seed")
                                                                  if k in cfg.typed}}) for c in configs]
    lines: list[str] = []

    def trained(trainer, summary: dict) -> None:
        saes = {n: st.sae for n, st in trainer.states.items()}
        lines.append(TrainResult(trainer.cfg, summary, None, 0, trainer.lm, saes, trainer.d_sae, trainer.k).text())
        if cfg.eval_tokens:
            c = trainer.cfg
            settings = EvalConfig(sae=c.out, data=c.data, text_column=c.text_column, n_tokens=cfg.eval_tokens,
                                  ctx_len=c.ctx_len, outlier_factor=c.outlier_factor)
            lines.append(run_eval(settings, scope=Scope(trainer.lm, saes)).text())

    results = train_seeds(configs, resume=cfg.resume, n_tokens=cfg.n_tokens, on_trained=trained)
    return SeedsResult(lines, results)
