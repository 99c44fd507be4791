"""SAE quality the way the field measures it, beside the random control: sparse probing on real labelled text
(saescope.api.probing), feature absorption on first letters (saescope.api.absorption), reconstruction on text of other
domains than the training corpus (FVU on maths, code and non-English prompts beside the held-out corpus), and how
far the decoders moved from their initialisation. CE recovered against zero and mean ablation, KL and dead/dense
fractions are `saescope eval`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saescope.api.absorption import AbsorptionConfig, feature_absorption, format_absorption
from saescope.api.controls import ControlsOption, control_kind, named_controls
from saescope.api.evaluate import fvu_on_texts, margin_words
from saescope.api.probing import TASKS, ProbeSet, format_probing, probe_sets, sparse_probing
from saescope.api.scope import SAEOptions, Scope
from saescope.core.data import iter_texts
from saescope.core.data.benchmarks import SharedDataOption, load_benchmark
from saescope.core.files import atomic_write_json
from saescope.core.io import RunDir, decoder_cos_to_init
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption
from saescope.core.models.load import DTYPE_NAMES
from saescope.core.sae import SAE
from saescope.core.schema import config_field

# Real prompt sets, none in the default training corpus: what a domain shift does to reconstruction.
DOMAINS = {"math": ("math", "gsm8k"), "code": ("humaneval", "codex_mbpp"),
           "multilingual": ("mgsm_fr", "mgsm_de", "mgsm_es", "mgsm_ru", "mgsm_ja", "mgsm_zh")}


DEFAULT_ABSORPTION = AbsorptionConfig()


def domain_texts(domain: str, shared_data: str | Path | None = None) -> list[str]:
    """The prompts of a domain's sets, interleaved so that a token budget samples every set."""
    sets = [load_benchmark(name, shared_data=shared_data).prompts for name in DOMAINS[domain]]
    return [texts[i] for i in range(max(map(len, sets))) for texts in sets if i < len(texts)]


def control_names(paths: list[str]) -> dict[str, str]:
    """The set name each control gets in a quality report: "control" for the first (the keys files have always had),
    "control2", "control3", ... for the others."""
    return {path: "control" if i == 0 else f"control{i + 1}" for i, path in enumerate(paths)}


def quality_report(scope: Scope, probes: list[ProbeSet], *, control: dict[int, SAE] | None = None,
                   controls: dict[str, dict[int, SAE]] | None = None, run: str | Path | None = None,
                   fvu_tokens: int = 4096, shared_data: str | Path | None = None, max_length: int = 128,
                   absorption: AbsorptionConfig | None = DEFAULT_ABSORPTION) -> dict:
    """Probing, absorption (None: skipped), FVU in and out of domain (SAEs and controls), and decoder movement (when
    `run` is a saescope run). `controls`: several by path (named as control_names says); `control`: one."""
    paths = control_names(list(controls or {}))
    named = named_controls(control, {paths[p]: c for p, c in (controls or {}).items()})
    sets = {"sae": scope.saes, **named}
    l0: dict = {}  # L0 mean and spread on the in-domain tokens: a threshold kind's L0 varies per token
    fvu = {"in_domain": fvu_on_texts(scope.lm, sets, iter_texts(None, split="eval"), n_tokens=fvu_tokens, l0=l0)}
    for domain in DOMAINS:
        fvu[domain] = fvu_on_texts(scope.lm, sets, domain_texts(domain, shared_data), n_tokens=fvu_tokens)
    probing = sparse_probing(scope, probes, controls=named, max_length=max_length)
    absorbed = feature_absorption(scope.lm, scope.saes, controls=named, cfg=absorption) if absorption else None
    moved = decoder_cos_to_init(Path(run)) if run is not None else {}
    layers = {}
    for n in scope.layers:
        row = dict(probing["mean_over_tasks"][str(n)])
        for domain, per_set in fvu.items():
            for name, per_layer in per_set.items():
                row[f"{name}_fvu_{domain}"] = per_layer[n]
        if absorbed is not None:
            got = absorbed["layers"][str(n)]
            row["letter_probe_f1"] = got["probe_f1"]
            for name in sets:
                row[f"{name}_absorption"] = got[name]["mean_absorption_fraction"]
                row[f"{name}_full_absorption"] = got[name]["full_absorption_rate"]
                row[f"{name}_letter_main_f1"] = got[name]["main_f1"]
        for name in sets:
            row[f"{name}_l0"], row[f"{name}_l0_std"] = l0[name][n]
        row["decoder_cos_to_init"] = moved.get(str(n))
        layers[str(n)] = row
    margins = [{"control": path, "kind": control_kind(controls[path]),
                "layers": {n: _margins(row, name) for n, row in layers.items()}} for path, name in paths.items()]
    return {"layers": layers, "probing": probing, "absorption": absorbed, "fvu_tokens": fvu_tokens,
            "domains": {d: list(s) for d, s in DOMAINS.items()}, **({"margins": margins} if margins else {})}


def _margins(row: dict, name: str) -> dict:
    """The SAEs' margin over control `name` at one layer, positive where the SAEs do better: probing top-1 and top-5
    with paired SEs over the test texts; FVU in and out of domain and absorption as plain differences on the same
    tokens and words."""
    out = {metric: row[f"{name}_margin_{metric}"] for metric in ("top1", "top5")}
    out.update({f"{metric}_se": row[f"{name}_margin_{metric}_se"] for metric in ("top1", "top5")})
    for domain in ("in_domain", *DOMAINS):
        out[f"fvu_{domain}"] = row[f"{name}_fvu_{domain}"] - row[f"sae_fvu_{domain}"]
    if f"{name}_absorption" in row:
        out["absorption"] = row[f"{name}_absorption"] - row["sae_absorption"]
        out["letter_main_f1"] = row["sae_letter_main_f1"] - row[f"{name}_letter_main_f1"]
    return out


def format_margins(report: dict) -> str:
    """Each control's margins, layer by layer, and what the probing margins say in words (earned: above two SEs)."""
    lines = []
    for entry in report.get("margins", []):
        lines.append(f"margin over {entry['kind']} control {entry['control']} (positive: the SAEs do better)")
        lines.append(f"{'layer':>5} {'top1 ± se':>15} {'top5 ± se':>15} {'FVU in':>7} {'math':>7} {'code':>7} {'multi':>7} "
                     f"{'absorb':>7}  words")
        for n, m in entry["layers"].items():
            absorb = f"{m['absorption']:+7.3f}" if "absorption" in m else f"{'-':>7}"
            words = f"top-1 {margin_words(m['top1'], m['top1_se'])}, top-5 {margin_words(m['top5'], m['top5_se'])}"
            lines.append(f"{n:>5} {m['top1']:+7.3f} ± {m['top1_se']:.3f} {m['top5']:+7.3f} ± {m['top5_se']:.3f} "
                         f"{m['fvu_in_domain']:+7.3f} {m['fvu_math']:+7.3f} {m['fvu_code']:+7.3f} "
                         f"{m['fvu_multilingual']:+7.3f} {absorb}  {words}")
    return "\n".join(lines)


def format_quality(report: dict) -> str:
    """One row per layer: probing (SAE, control, dense), FVU in and out of domain, decoder movement."""
    rows = report["layers"]
    first = next(iter(rows.values()))
    ctl = "control_top1" in first
    varies = any((r.get("sae_l0_std") or 0) > 0.5 for r in rows.values())  # show L0 where a threshold kind varies it
    head = (f"{'layer':>5} {'top1':>6} " + (f"{'ctl':>6} {'margin ± se':>13} " if ctl else "") + f"{'top5':>6} "
            + (f"{'ctl':>6} " if ctl else "")
            + f"{'dense':>6} {'FVU in':>7} {'math':>6} {'code':>6} {'multi':>6} " + (f"{'ctl in':>7} " if ctl else "")
            + (f"{'L0':>6} {'L0 sd':>6} " if varies else "") + f"{'cos0':>5}")
    lines = [f"quality: sparse probing (mean accuracy over {len(report['probing']['tasks'])} tasks, chance 0.5), "
             "FVU by domain, decoder cosine to init", head]
    for n, r in rows.items():
        cos = f"{r['decoder_cos_to_init']:5.2f}" if r.get("decoder_cos_to_init") is not None else f"{'-':>5}"
        margin = f"{r['top1_margin']:+6.3f} ± {r['top1_margin_se']:.3f}" if "top1_margin" in r else "-"
        lines.append(f"{n:>5} {r['sae_top1']:6.3f} " + (f"{r['control_top1']:6.3f} {margin:>13} " if ctl else "") + f"{r['sae_top5']:6.3f} "
                     + (f"{r['control_top5']:6.3f} " if ctl else "") + f"{r['dense']:6.3f} {r['sae_fvu_in_domain']:7.3f} "
                     f"{r['sae_fvu_math']:6.3f} {r['sae_fvu_code']:6.3f} {r['sae_fvu_multilingual']:6.3f} "
                     + (f"{r['control_fvu_in_domain']:7.3f} " if ctl else "")
                     + (f"{r['sae_l0']:6.1f} {r['sae_l0_std']:6.1f} " if varies else "") + cos)
    return "\n".join(lines)


@dataclass(kw_only=True)
class QualityConfig(SAEOptions, LayersOption, ControlsOption, SharedDataOption):
    """`saescope quality`: sparse probing on real labelled text (SAEBench), first-letter feature absorption, FVU on
    maths, code and non-English text, and decoder movement, beside each control given (the first in the tables, every
    one's margins)."""

    tasks: list[str] | None = config_field(None, f"probe tasks (default: all of {', '.join(TASKS)})", choices=tuple(TASKS))
    per_class: int = config_field(100, "texts per class and task (a seeded sample)", min=1)
    max_length: int = config_field(128, "tokens per probed text", min=1)
    fvu_tokens: int = config_field(4096, "tokens per domain for FVU", min=1)
    absorption_words: int = config_field(1200, "words for the first-letter feature-absorption measurement (0 = skip it)", min=0)
    seed: int = config_field(0, "the seed of the probe samples and word split", min=0)
    out: str | None = config_field(None, "JSON results (default: SAE/quality.json)", output="file")

    def output(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).quality

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class QualityResult:
    path: Path
    report: dict

    def text(self) -> str:
        parts = [format_probing(self.report["probing"])]
        if self.report["absorption"]:
            parts.append(format_absorption(self.report["absorption"]))
        margins = [format_margins(self.report)] if self.report.get("margins") else []
        return "\n".join([*parts, format_quality(self.report), *margins, f"quality results: {self.path}"])


@holding_lock
def run_quality(cfg: QualityConfig) -> QualityResult:
    probes = probe_sets(cfg.tasks, per_class=cfg.per_class, seed=cfg.seed, shared_data=cfg.shared_data)  # data first
    absorption = AbsorptionConfig(n_words=cfg.absorption_words, seed=cfg.seed) if cfg.absorption_words else None
    scope = cfg.load_scope(cfg.layer_list())
    controls = cfg.load_controls(scope.saes)
    report = quality_report(scope, probes, controls=controls, run=cfg.sae, fvu_tokens=cfg.fvu_tokens,
                            max_length=cfg.max_length, absorption=absorption, shared_data=cfg.shared_data)
    report.update(sae=cfg.sae, control_path=cfg.control[0] if cfg.control else None, per_class=cfg.per_class, seed=cfg.seed,
                  model_dtype=DTYPE_NAMES[scope.lm.dtype])
    out = cfg.output()
    atomic_write_json(out, report)
    return QualityResult(out, report)
