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
from saescope.api.controls import ControlOption
from saescope.api.evaluate import fvu_on_texts
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


def quality_report(scope: Scope, probes: list[ProbeSet], *, control: dict[int, SAE] | None = None,
                   run: str | Path | None = None, fvu_tokens: int = 4096, shared_data: str | Path | None = None,
                   max_length: int = 128, absorption: AbsorptionConfig | None = DEFAULT_ABSORPTION) -> dict:
    """Probing, absorption (None: skipped), FVU in and out of domain (SAEs and control), and decoder movement (when
    `run` is a saescope run)."""
    sets = {"sae": scope.saes, **({"control": control} if control is not None else {})}
    l0: dict = {}  # L0 mean and spread on the in-domain tokens: a threshold kind's L0 varies per token
    fvu = {"in_domain": fvu_on_texts(scope.lm, sets, iter_texts(None, split="eval"), n_tokens=fvu_tokens, l0=l0)}
    for domain in DOMAINS:
        fvu[domain] = fvu_on_texts(scope.lm, sets, domain_texts(domain, shared_data), n_tokens=fvu_tokens)
    probing = sparse_probing(scope, probes, control=control, max_length=max_length)
    absorbed = feature_absorption(scope.lm, scope.saes, control=control, cfg=absorption) if absorption else None
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
    return {"layers": layers, "probing": probing, "absorption": absorbed, "fvu_tokens": fvu_tokens,
            "domains": {d: list(s) for d, s in DOMAINS.items()}}


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
class QualityConfig(SAEOptions, LayersOption, ControlOption, SharedDataOption):
    """`saescope quality`: sparse probing on real labelled text (SAEBench), first-letter feature absorption, FVU on
    maths, code and non-English text, and decoder movement, beside the control when given."""

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
        return "\n".join([*parts, format_quality(self.report), f"quality results: {self.path}"])


@holding_lock
def run_quality(cfg: QualityConfig) -> QualityResult:
    probes = probe_sets(cfg.tasks, per_class=cfg.per_class, seed=cfg.seed, shared_data=cfg.shared_data)  # data first
    absorption = AbsorptionConfig(n_words=cfg.absorption_words, seed=cfg.seed) if cfg.absorption_words else None
    scope = cfg.load_scope(cfg.layer_list())
    control = cfg.load_control(scope.saes)
    report = quality_report(scope, probes, control=control, run=cfg.sae, fvu_tokens=cfg.fvu_tokens, max_length=cfg.max_length,
                            absorption=absorption, shared_data=cfg.shared_data)
    report.update(sae=cfg.sae, control_path=cfg.control, per_class=cfg.per_class, seed=cfg.seed,
                  model_dtype=DTYPE_NAMES[scope.lm.dtype])
    out = cfg.output()
    atomic_write_json(out, report)
    return QualityResult(out, report)
