"""Coverage and synthesis as commands: `coverage` (the share of target features a dataset fires; with `select`, the
smallest subset of a labelled pool that keeps it, beside random subsets) and `synthesize` (examples aimed at the targets
a dataset misses, each kept only if it fires its target; the same budget unguided as the control)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saescope.api.hits import encode_labelled
from saescope.api.scope import SAEOptions, Scope
from saescope.api.store import FeatureStore
from saescope.apps.synthesis.coverage import (
    TargetSet,
    coverage,
    derive_targets,
    format_selection,
    load_targets,
    selection_study,
    target_matrix,
)
from saescope.apps.synthesis.generate import SynthConfig, synthesize
from saescope.core.data.benchmarks import SharedDataOption
from saescope.core.data.labelled import ColumnsOption, LabelledSet, TextColumnOption, group_split, load_labelled, test_mask, text_source
from saescope.core.errors import ParamError
from saescope.core.files import atomic_write_json, write_jsonl
from saescope.core.io import RunDir, fingerprint
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption
from saescope.core.models import load_model
from saescope.core.schema import REQUIRED, config_field, escape

DATA_HELP = "a built-in labelled set (hatecheck_en, french, ...) or a file of texts (labels optional)"
TARGETS_HELP = "a targets file, a rules file (its features), or ids such as 15:3,15:40"


def texts_and_labels(spec: str, cfg: TextColumnOption, shared_data: str | None) -> tuple[LabelledSet, bool]:
    """The texts of SPEC as a labelled set, and whether the labels are its own (else every text is labelled negative:
    coverage reads no label)."""
    source = text_source(spec, text_column=cfg.text_column, label_column=getattr(cfg, "label_column", None),
                         shared_data=shared_data)
    if source.labelled is not None:
        return source.labelled, True
    texts = list(source.texts)
    return LabelledSet(Path(spec).name, texts, np.zeros(len(texts), dtype=np.int64), [f"row{i}" for i in range(len(texts))],
                       [""] * len(texts)), False


def store_evidence(store: FeatureStore, targets: TargetSet, contexts: int) -> dict[tuple[int, int], dict]:
    """Per target the store saw: its top contexts, the tokens its decoder promotes, and its top activation (the layer's
    median top activation for a target the store never saw fire: the scale a relative steering strength reads)."""
    scale = {}
    for n in targets.layers:
        if n in store.layers:
            top = store.top_activations(n)
            scale[n] = float(top[top > 0].median()) if (top > 0).any() else 0.0
    evidence = {}
    for t in targets.targets:
        if t.layer in store.layers:
            got = store.feature(t.layer, t.feature, contexts=contexts)
            evidence[(t.layer, t.feature)] = {"contexts": ["".join(c["tokens"]) for c in got["contexts"]],
                                              "promoted": [w for w, _ in got["promoted"]],
                                              "max_activation": got["max_activation"] or scale[t.layer]}
    return evidence


@dataclass(kw_only=True)
class CoverageConfig(SAEOptions, LayersOption, ColumnsOption, SharedDataOption):
    """`saescope coverage`: the fraction of target features a dataset fires; with `select`, the smallest subset of a
    labelled pool that keeps it, beside random subsets."""

    data: str = config_field(REQUIRED, "the dataset whose coverage is measured: " + DATA_HELP)
    targets: str | None = config_field(None, TARGETS_HELP)
    derive_from: str | None = config_field(None, "derive targets from this labelled set instead: features its positive "
                                           "(and negative) texts fire that the other class rarely does")
    n: int = config_field(60, "derived targets, half per class", min=1)
    background_rate: float | None = config_field(None, "derived targets must fire on at most this share of general-text "
                                                 "tokens (the feature store's frequency; needs SAE/features or a store): "
                                                 "features specific to the set", min=0, max=1)
    store: str | None = config_field(None, "feature store for the background rate (default: SAE/features)")
    select: bool = config_field(False, "greedy selection on the data's mining side (template split), F1 of rules mined on "
                                "it against the whole and random subsets, on the held-out side")
    goals: list[float] = config_field([0.5, 0.8, 0.9, 1.0], "coverage goals for the selection", min=0, max=1, min_open=True)
    batch_size: int = config_field(32, "texts per batch", min=1)
    json: str | None = config_field(None, "results (default: SAE/toxicity/coverage.json)", output="file")
    save_targets: str | None = config_field(None, "where derived targets go (default: SAE/toxicity/targets.json)",
                                            output="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.targets) == bool(self.derive_from):
            raise ParamError("give {} or {} (one of them)", "targets", "derive_from")

    def output(self) -> Path:
        return Path(self.json) if self.json else RunDir.of_sae(self.sae).toxicity / "coverage.json"

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class CoverageResult:
    path: Path
    result: dict
    derived: str | None = None

    def text(self) -> str:
        r = self.result
        lines = [self.derived] if self.derived else []
        lines.append(f"coverage of {r['n_targets']} targets by {r['data']} ({r['n_texts']} texts): {r['coverage']:.1%} "
                     f"({r['covered']} covered, {len(r['uncovered'])} not)")
        if "selection" in r:
            lines.append(format_selection(r["selection"]))
        lines.append(f"coverage results: {self.path}")
        return "\n".join(lines)


def _derived_targets(cfg: CoverageConfig, scope: Scope, out_dir: Path) -> tuple[TargetSet, str]:
    ds = load_labelled(cfg.derive_from, shared_data=cfg.shared_data)
    if cfg.select:  # the selection is scored on held-out templates: targets never see them
        ds = group_split(ds)[0]
    background = None
    if cfg.background_rate is not None:
        store = FeatureStore(Path(cfg.store) if cfg.store else RunDir.of_sae(cfg.sae).features)
        store.check_matches(scope.saes, cfg.sae)
        background = {n: store.frequencies(store.check_layer(n)).numpy() for n in scope.layers}
    enc = encode_labelled(scope, ds, residual=False, batch_size=cfg.batch_size)
    derived = derive_targets(enc.hits["sae"], ds.labels, n=cfg.n, background=background,
                             max_background=cfg.background_rate if cfg.background_rate is not None else 1.0)
    targets = TargetSet(derived, scope.lm.name, cfg.sae, {n: fingerprint(scope.saes[n]) for n in {t.layer for t in derived}})
    path = Path(cfg.save_targets) if cfg.save_targets else out_dir / "targets.json"
    targets.save(path)
    positives = sum(t.label == "positive" for t in derived)
    return targets, f"{len(derived)} targets derived from {ds.name} ({positives} positive): {path}"


@holding_lock
def run_coverage(cfg: CoverageConfig) -> CoverageResult:
    data, labelled = texts_and_labels(cfg.data, cfg, cfg.shared_data)
    if cfg.select and not labelled:
        raise ParamError("{} needs labelled data (a built-in set, or a file with {})", "select", "label_column")
    out_dir = RunDir.of_sae(cfg.sae).toxicity
    given = load_targets(cfg.targets) if cfg.targets else None  # checked against the SAEs before any model loads
    scope = cfg.load_scope(cfg.layer_list(), check=(lambda saes: given.check_saes(saes, cfg.sae)) if given else None)
    derived = None
    targets = given
    if targets is None:
        targets, derived = _derived_targets(cfg, scope, out_dir)
    enc = encode_labelled(scope, data, layers=targets.layers, residual=False, batch_size=cfg.batch_size)
    cov = coverage(target_matrix(enc.hits["sae"], targets.targets))
    per_target = list(zip(targets.targets, cov["texts_per_target"], strict=True))
    result = {"data": cfg.data, "n_texts": len(data), **cov, "targets": [{**vars(t), "texts": c} for t, c in per_target],
              "uncovered": [[t.layer, t.feature] for t, c in per_target if not c]}
    if cfg.select:
        group_split(data)  # refuses a split that leaves one class on a side
        held = test_mask(data)
        result["selection"] = selection_study(enc.subset(~held), enc.subset(held), targets.targets, goals=tuple(cfg.goals))
    out = cfg.output()
    atomic_write_json(out, result)
    return CoverageResult(out, result, derived)


@dataclass(kw_only=True)
class SynthesizeConfig(SAEOptions, SynthConfig, TextColumnOption, SharedDataOption):
    """`saescope synthesize`: generate examples aimed at the target features the data does not fire; keep each only if
    it fires its target; the same budget unguided as the control."""

    targets: str = config_field(REQUIRED, TARGETS_HELP)
    data: str = config_field(REQUIRED, "the seed dataset: " + DATA_HELP)
    generator: str | None = config_field(None, "the model that writes candidates (default: the SAEs' own model)")
    store: str | None = config_field(None, "feature store for the evidence (default: SAE/features when present)")
    out: str | None = config_field(None, "kept examples, JSON lines (default: SAE/toxicity/synthesized.jsonl); the figures "
                                   "go beside it (.json)", output="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generator and self.strength()[0]:
            raise ParamError("{} needs the SAEs' own model as the generator (leave out {})", "steer", "generator")

    def output(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).toxicity / "synthesized.jsonl"

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class SynthesizeResult:
    path: Path
    result: dict
    notes: list[str]

    def text(self) -> str:
        r, u, eq = self.result, self.result["unguided"], self.result["at_equal_data"]
        return "\n".join([*self.notes,
                          f"coverage of {r['n_targets']} targets: {r['coverage_before']:.1%} with {r['data']} -> "
                          f"{r['coverage_after']:.1%} after synthesis ({r['kept']} kept of {r['generated']} generated, "
                          f"{r['seconds']:.0f} s); unguided, same budget: {u['coverage_after']:.1%} ({u['generated']} "
                          f"generated, {u['seconds']:.0f} s)",
                          f"at equal data ({eq['examples']} examples added to each): guided {eq['guided']:.1%}, unguided "
                          f"{eq['unguided']:.1%} (unguided kept {u['kept']} of its {u['generated']} candidates)",
                          f"examples: {self.path}"])


@holding_lock
def run_synthesize(cfg: SynthesizeConfig) -> SynthesizeResult:
    data, _ = texts_and_labels(cfg.data, cfg, cfg.shared_data)
    targets = load_targets(cfg.targets)
    scope = cfg.load_scope(targets.layers, check=lambda saes: targets.check_saes(saes, cfg.sae))
    if cfg.generator:
        try:
            generator = load_model(cfg.generator)
        except Exception as exc:  # any failure to load is the user's input here, named in one line
            raise ParamError(f"{{}} {escape(cfg.generator)}: cannot be loaded ({escape(str(exc).splitlines()[0][:200])})",
                             "generator") from None
    else:
        generator = scope.lm
    store_path = Path(cfg.store) if cfg.store else RunDir.of_sae(cfg.sae).features
    evidence, notes = {}, []
    if cfg.store or (store_path / "store.json").is_file():
        store = FeatureStore(store_path)
        store.check_matches(scope.saes, cfg.sae)
        evidence = store_evidence(store, targets, cfg.contexts)
    elif cfg.strength()[1]:
        raise ParamError(f"{{}} {escape(str(cfg.steer))}: a multiple of the top activation needs a feature store "
                         f"({escape(str(store_path))} has none; build one with saescope features build, or give {{}})",
                         "steer", "store")
    else:
        notes.append("no feature store: prompts carry the target's class only (build one with saescope features build)")
    enc = encode_labelled(scope, data, layers=targets.layers, residual=False)
    covered = target_matrix(enc.hits["sae"], targets.targets).any(0)
    result = synthesize(scope, generator, targets.targets, covered, cfg, evidence=evidence)
    out = cfg.output()
    write_jsonl(out, result["examples"])
    result.update(data=cfg.data, generator=generator.name, targets=cfg.targets, evidence=bool(evidence))
    atomic_write_json(out.with_suffix(".json"), result)
    return SynthesizeResult(out, result, notes)
