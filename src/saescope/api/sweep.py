"""`saescope sweep`: several SAEs (kinds x sparsities) trained from one activation cache in one process, evaluated on
the same held-out tokens beside a random control of each, and compared in one table and one plot (L0 against FVU,
CE recovered and sparse probing, as SAEBench plots them).

    OUT/{arch}-k{k}/     one training run each (resumable: a finished run is kept, an unfinished one goes on)
    OUT/sweep.json       one row per run and layer: training speed, eval and quality figures, the control's
    OUT/sweep.png        L0 against FVU, CE recovered (mean ablation) and probing top-1, one line per kind
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from saescope.api.evaluate import as_records, evaluate_sets, read_results, write_results
from saescope.api.scope import ModelDtypeOption, Scope
from saescope.core.activation_cache import open_activations
from saescope.core.data.benchmarks import SharedDataOption
from saescope.core.errors import ParamError
from saescope.core.files import atomic_write_json, read_json
from saescope.core.io import RunDir, load_saes, read_summary
from saescope.core.io.lock import holding_lock
from saescope.core.models import load_model
from saescope.core.models.load import DTYPE_NAMES
from saescope.core.render import figure, png
from saescope.core.sae import TRAINABLE_KINDS, random_like
from saescope.core.schema import REQUIRED, config_field, escape
from saescope.core.train import TrainConfig, run_train


def _list(spec: str, name: str, parse) -> list:
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ParamError(f"{{}} names nothing: give a comma-separated list, e.g. {escape('16,32,64')}", name)
    try:
        return list(dict.fromkeys(parse(s) for s in items))
    except ValueError:
        raise ParamError(f"{{}}: {escape(spec)} is not a comma-separated list of whole numbers", name) from None


@dataclass(kw_only=True)
class SweepConfig(ModelDtypeOption, SharedDataOption):
    """`saescope sweep`: SAEs of several kinds and k trained from one cache, then compared in one table."""

    activations: str = config_field(REQUIRED, "the activation cache (saescope cache) or a .npy / .safetensors file")
    out: str = config_field(REQUIRED, "the sweep folder: one run per kind and k, sweep.json, sweep.png", output="folder")
    arch: str = config_field("topk", f"comma-separated SAE kinds among {', '.join(TRAINABLE_KINDS)}")
    k: str = config_field("32", "comma-separated k (the mean L0 of the kinds whose L0 varies), e.g. 16,32,64")
    expansion: int = config_field(16, "d_sae / d_model", min=1)
    layers: str | None = config_field(None, "the cached layers to train (default: all)")
    max_tokens: int = config_field(1_000_000, "training tokens per SAE (more than the cache: several passes)", min=1)
    batch_size: int | None = config_field(None, "sequences of ctx_len tokens per step (default: follows --max-tokens)", min=1)
    ctx_len: int = config_field(256, "with --batch-size: tokens per step = batch_size x ctx_len", min=2)
    lr: float | None = config_field(None, "learning rate (default: the training default for the width and steps)",
                                    min=0, min_open=True)
    l0_coef: float | None = config_field(None, "jumprelu's L0 loss weight (default 1)", min=0)
    seed: int = config_field(0, "initialisation and data order of every run", min=0)
    eval_tokens: int = config_field(0, "held-out tokens to evaluate each SAE and its random control on with the LM "
                                    "(FVU, L0 mean and spread, dead/dense, CE recovered); 0 = train only", min=0)
    quality: bool = config_field(False, "also sparse probing (beside the control and the dense probe), first-letter "
                                 "absorption and FVU by domain (saescope quality; minutes per SAE)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for kind in self.arch_list():
            if kind not in TRAINABLE_KINDS:
                raise ParamError(f"{{}}: {escape(kind)} is not a kind saescope trains ({escape(', '.join(TRAINABLE_KINDS))})",
                                 "arch")
        if any(k < 1 for k in self.k_list()):
            raise ParamError("{} must be positive whole numbers", "k")
        if self.l0_coef is not None and "jumprelu" not in self.arch_list():
            raise ParamError("{} weighs jumprelu's L0 loss; this sweep trains no jumprelu SAE", "l0_coef")
        if self.quality and not self.eval_tokens:
            raise ParamError("{} measures the SAEs with the LM after training: give {} too", "quality", "eval_tokens")

    def arch_list(self) -> list[str]:
        return _list(self.arch, "arch", str)

    def k_list(self) -> list[int]:
        return _list(self.k, "k", int)

    def writes_into(self) -> Path:
        return Path(self.out)

    def runs(self) -> list[tuple[str, int, TrainConfig]]:
        out = []
        for kind in self.arch_list():
            for k in self.k_list():
                cfg = TrainConfig(activations=self.activations, out=str(Path(self.out) / f"{kind}-k{k}"), arch=kind, k=k,
                                  expansion=self.expansion, layers=self.layers, max_tokens=self.max_tokens,
                                  batch_size=self.batch_size, ctx_len=self.ctx_len, lr=self.lr, seed=self.seed,
                                  l0_coef=self.l0_coef if kind == "jumprelu" else None)
                out.append((kind, k, cfg))
        return out


@dataclass
class SweepResult:
    out: Path
    rows: list[dict] = field(default_factory=list)
    plot: Path | None = None

    def text(self) -> str:
        lines = [format_sweep(self.rows), f"sweep results: {self.out / 'sweep.json'}"]
        if self.plot:
            lines.append(f"plot: {self.plot}")
        return "\n".join(lines)


COLUMNS = (("arch", "kind", "{:>10}"), ("k", "k", "{:>4}"), ("layer", "layer", "{:>5}"), ("train_tok_s", "tok/s", "{:>7.0f}"),
           ("fvu", "FVU", "{:>6.3f}"), ("control_fvu", "ctl", "{:>6.3f}"), ("l0", "L0", "{:>6.1f}"), ("l0_std", "L0 sd", "{:>5.1f}"),
           ("dead_frac", "dead", "{:>5.3f}"), ("dense_frac", "dense", "{:>5.3f}"), ("ce_recovered", "CE rec0", "{:>7.3f}"),
           ("ce_recovered_mean", "CE recμ", "{:>7.3f}"), ("control_ce_recovered_mean", "ctl", "{:>6.3f}"),
           ("sae_top1", "top1", "{:>5.3f}"), ("control_top1", "ctl", "{:>5.3f}"), ("sae_top5", "top5", "{:>5.3f}"),
           ("control_top5", "ctl", "{:>5.3f}"), ("dense", "dense", "{:>5.3f}"), ("sae_absorption", "absorb", "{:>6.3f}"),
           ("control_absorption", "ctl", "{:>5.3f}"), ("sae_letter_main_f1", "F1", "{:>5.3f}"),
           ("decoder_cos_to_init", "cos0", "{:>5.2f}"))


def format_sweep(rows: list[dict]) -> str:
    """One line per run and layer; a column appears when some row has it (eval and quality figures are optional)."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    width = [len(fmt.format(1.0 if "f}" in fmt else "x")) for _, _, fmt in cols]
    head = " ".join(f"{title:>{w}}" for (_, title, _), w in zip(cols, width))

    def cell(v, fmt: str, w: int) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return f"{'-':>{w}}"
        return fmt.format(v)

    return "\n".join([head, *(" ".join(cell(r.get(name), fmt, w) for (name, _, fmt), w in zip(cols, width)) for r in rows)])


def _train(cfg: TrainConfig) -> None:
    run = RunDir(cfg.out)
    summary = read_summary(run.path) if run.has_run() else None
    if summary is not None and summary["tokens"] >= cfg.max_tokens:
        return  # trained by an earlier sweep
    if run.has_run():
        run_train(TrainConfig.resumed(cfg.out, max_tokens=cfg.max_tokens), resume=True)
    else:
        run_train(cfg)


def _plot(rows: list[dict], out: Path) -> Path | None:
    panels = [(key, label) for key, label in (("fvu", "FVU"), ("ce_recovered_mean", "CE recovered (mean ablation)"),
                                               ("sae_top1", "sparse probing top-1"))
              if any(r.get(key) is not None for r in rows)]
    if not panels:
        return None
    fig, axes = figure(len(panels))
    for ax, (key, label) in zip(axes, panels):
        for kind in dict.fromkeys(r["arch"] for r in rows):
            mine = sorted((r for r in rows if r["arch"] == kind and r.get(key) is not None), key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in mine], [r[key] for r in mine], marker="o", label=kind)
        control_key = {"fvu": "control_fvu", "ce_recovered_mean": "control_ce_recovered_mean", "sae_top1": "control_top1"}[key]
        ctl = [r for r in rows if r.get(control_key) is not None]
        if ctl:
            ax.scatter([r["l0"] for r in ctl], [r[control_key] for r in ctl], marker="x", color="grey", label="random control")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (mean latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    path = out / "sweep.png"
    png(fig, save_to=path)
    return path


@holding_lock
def run_sweep(cfg: SweepConfig) -> SweepResult:
    out = Path(cfg.out)
    runs = cfg.runs()
    open_activations(cfg.activations, layer=None)  # a bad cache is refused before the first run
    for _, _, train_cfg in runs:
        _train(train_cfg)
    rows: list[dict] = []
    scope_lm = None
    for kind, k, train_cfg in runs:
        run = RunDir(train_cfg.out)
        summary = read_summary(run.path)
        saes = load_saes(run.path)
        for n, sae in saes.items():
            rows.append({"arch": kind, "k": k, "layer": n, "run": str(run.path.relative_to(out)), "d_sae": sae.cfg.d_sae,
                         "train_tok_s": summary["tokens_per_s"], "train_tokens": summary["tokens"],
                         "decoder_cos_to_init": summary["layers"][str(n)]["decoder_cos_to_init"]})
        if not cfg.eval_tokens:
            continue
        if scope_lm is None:
            scope_lm = load_model(next(iter(saes.values())).meta.get("model"), dtype=cfg.model_dtype)
        controls = {n: random_like(sae, seed=cfg.seed * 100_003 + n) for n, sae in saes.items()}
        mine = [r for r in rows if r["run"] == str(run.path.relative_to(out))]
        _evaluate(scope_lm, saes, controls, run, cfg, mine)
        if cfg.quality:
            _quality(scope_lm, saes, controls, run, cfg, mine)
    atomic_write_json(out / "sweep.json", {"activations": cfg.activations, "max_tokens": cfg.max_tokens,
                                            "expansion": cfg.expansion, "eval_tokens": cfg.eval_tokens,
                                            "model_dtype": DTYPE_NAMES.get(scope_lm.dtype) if scope_lm else None,
                                            "rows": rows})
    return SweepResult(out, rows, _plot(rows, out))


def _evaluate(lm, saes, controls, run: RunDir, cfg: SweepConfig, rows: list[dict]) -> None:
    source = open_activations(cfg.activations)
    data = source.info.get("data") if source.info else None
    settings = {"data": data, "text_column": "text", "n_tokens": cfg.eval_tokens, "ctx_len": 256, "outlier_factor": 5.0}
    recorded = {"model": lm.name, **{key: v for key, v in settings.items() if key != "data"}, "data": data or "default",
                "model_dtype": DTYPE_NAMES.get(lm.dtype, str(lm.dtype))}
    earlier = read_results(run.eval)
    if earlier and earlier.get("control") and all(earlier.get(key) == value for key, value in recorded.items()):
        sae_records, control_records = earlier["layers"], earlier["control"]  # an earlier sweep's, same settings
    else:
        results = evaluate_sets(lm, {"sae": saes, "control": controls}, **settings)
        write_results(results["sae"], run.eval, recorded, control=results["control"])
        sae_records, control_records = as_records(results["sae"]), as_records(results["control"])
    by_layer = {r["layer"]: r for r in sae_records}
    control_by_layer = {r["layer"]: r for r in control_records}
    for row in rows:
        sae_rec, ctl_rec = by_layer[row["layer"]], control_by_layer[row["layer"]]
        row.update({key: sae_rec.get(key) for key in ("fvu", "l0", "l0_std", "dead_frac", "dense_frac", "ce_recovered",
                                                  "ce_recovered_mean", "kl")})
        row.update({f"control_{key}": ctl_rec.get(key) for key in ("fvu", "l0", "ce_recovered", "ce_recovered_mean")})


def _quality(lm, saes, controls, run: RunDir, cfg: SweepConfig, rows: list[dict]) -> None:
    from saescope.api.probing import probe_sets
    from saescope.api.quality import quality_report

    if run.quality.exists():  # an earlier sweep's (the same SAEs: a finished run is never retrained)
        report = read_json(run.quality)
    else:
        probes = probe_sets(None, per_class=100, seed=0, shared_data=cfg.shared_data)
        report = quality_report(Scope(lm, saes), probes, control=controls, run=run.path, shared_data=cfg.shared_data)
        atomic_write_json(run.quality, report)
    for row in rows:
        got = report["layers"][str(row["layer"])]
        row.update({key: got.get(key) for key in ("sae_top1", "control_top1", "sae_top5", "control_top5", "dense",
                                                  "sae_absorption", "control_absorption", "sae_letter_main_f1",
                                                  "control_letter_main_f1", "letter_probe_f1", "sae_fvu_in_domain")})
