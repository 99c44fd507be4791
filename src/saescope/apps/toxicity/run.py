"""Toxicity rules as commands: `mine` (rank features by P(fire | toxic) - P(fire | clean) and write the top-K rules),
`classify` (apply a rule to texts, one audit record per decision) and `eval` (the rules on held-out texts beside the
control, a residual probe, a bag of words and always-positive; F1 against the mining fraction; the transfer matrix).
Each is a config and a run_* returning a result that writes its files and prints its table."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saescope.api.controls import ControlOption
from saescope.api.hits import encode_labelled, load_encoded, save_encoded, scores
from saescope.api.rules import DEFAULT_FOLDS, DEFAULT_KS, RuleSet, cross_validated, generic_name, make_ruleset, rules_dtype
from saescope.api.scope import MODEL_DTYPES, SAE_HELP, SAEOptions, Scope
from saescope.api.store import FeatureStore
from saescope.apps.toxicity.classify import AuditLog, RuleClassifier
from saescope.apps.toxicity.evaluate import (
    BenchConfig,
    benchmark,
    format_benchmark,
    format_transfer,
    group_subset,
    mine_each,
    transfer_matrix,
)
from saescope.apps.toxicity.render import write_eval_section, write_section
from saescope.core.data.benchmarks import SharedDataOption
from saescope.core.data.labelled import (
    LABEL_HELP,
    MHC_LANGUAGES,
    NATURAL,
    NATURAL_BY_LANGUAGE,
    LabelledColumns,
    LabelledSet,
    builtin_name,
    check_definitions,
    group_split,
    load_labelled,
    split_rule,
    text_source,
)
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_json
from saescope.core.io import RunDir, fingerprint, load_saes
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption
from saescope.core.models import load_model
from saescope.core.models.load import DTYPE_NAMES
from saescope.core.sae import SAE
from saescope.core.schema import REQUIRED, Config, config_field, escape

SPLITS = ("mine", "all")


def mining_side(data: LabelledSet, split: str, fraction: float, seed: int, per_class: int | None = None) -> LabelledSet:
    """The texts rules are mined on: the mining side of the split (or all of them), at most `per_class` texts of each
    class (a seeded sample: the report mines on about 2,000 of each), then a `fraction` of its groups."""
    side = group_split(data, seed=seed)[0] if split == "mine" else data
    if per_class is not None and max(side.counts()) > per_class:
        rng = np.random.default_rng(seed)
        keep = np.zeros(len(side), dtype=bool)
        for label in (0, 1):
            idx = np.flatnonzero(side.labels == label)
            keep[idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False)] = True
        side = side.subset(keep, f"{side.name}[{per_class} per class]")
    if fraction < 1:
        side = side.subset(group_subset(side, fraction, np.random.default_rng(seed)), f"{side.name}[{fraction:g}]")
    return side


@dataclass(kw_only=True)
class MineConfig(SAEOptions, LayersOption, LabelledColumns, ControlOption, SharedDataOption):
    """`saescope toxicity mine`: rank features by P(fire | toxic) - P(fire | clean) and write the top-K rules; with
    --control, each rule's cross-validated figure beside the control's same rule, and the mining side's encoding kept
    for `toxicity eval` (one LM pass for both)."""

    data: str = config_field(REQUIRED, LABEL_HELP)
    rule_k: list[int] = config_field(list(DEFAULT_KS), "rule sizes to mine: each rule is the K features of largest delta",
                                     min=1, max=1000)
    threshold: float = config_field(0.0, "a feature fires when its max activation exceeds this", min=0)
    split: str = config_field("mine", "mine on the mining side of the template split (`eval` then scores the other side) "
                              "or on every text (when the evaluation data is elsewhere)", choices=SPLITS)
    fraction: float = config_field(1.0, "mine on this share of the mining templates", min=0, max=1, min_open=True)
    per_class: int | None = config_field(2000, "mine on at most this many texts of each class (a seeded sample; the "
                                         "report's 2,000 toxic and 2,000 clean); 0 = all", min=0)
    seed: int = config_field(0, "the seed of the split and of the fraction's draw", min=0)
    folds: int = config_field(DEFAULT_FOLDS, "the default rule is the best in this many folds of cross-validation on the "
                              "mining texts (1: on the mining texts themselves)", min=1)
    batch_size: int = config_field(32, "texts per batch", min=1)
    out: str | None = config_field(None, "rules file (default: SAE/toxicity/rules.json)", output="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rule_k:
            raise ParamError("{} names no rule size", "rule_k")

    def output(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).toxicity / "rules.json"

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class MineResult:
    path: Path
    rules: RuleSet
    side: LabelledSet

    def text(self) -> str:
        r = self.rules
        lines = [f"mined on {self.side.name}: {len(self.side)} texts ({self.side.counts()[1]} positive); layer chosen by "
                 f"top1-diff: {r.choice['chosen_layer']}"]
        control = r.choice.get("cv_balanced_accuracy_control", {})
        for rule in r.rules:
            if rule.weights:  # sparse and weighted rules; the weighted kinds' weights are per their features' scales
                reads = rule.reads or ("",) * len(rule.scales)  # a "both" rule names each term's statistic
                per = [f" per {s + ' ' if s else ''}activation {v:.3g}" for v, s in zip(rule.scales, reads, strict=True)]
                feats = f"bias {rule.bias:+.2f}; " + ", ".join(
                    f"L{f.layer}/{f.feature} (weight {w:+.2f}{p})"
                    for f, w, p in zip(rule.features, rule.weights, per or [""] * len(rule.weights), strict=True))
            else:
                feats = ", ".join(f"L{f.layer}/{f.feature} ({f.delta:+.2f})" for f in rule.features)
            mark = "  <- default" if rule.name == r.default else ""
            cv = r.choice.get("cv_balanced_accuracy", {}).get(rule.name)
            beside = f", control {control[generic_name(rule.name)]:.3f}" if generic_name(rule.name) in control else ""
            held = f" ({r.choice['default_by']}: {cv:.3f}{beside})" if cv is not None else ""
            lines.append(f"  {rule.name:<14} on the mining texts F1 {r.choice['mining_f1'][rule.name]:.3f}, balanced accuracy "
                         f"{r.choice['mining_balanced_accuracy'][rule.name]:.3f}{held}: {feats}{mark}")
        lines.append(f"rules: {self.path}")
        return "\n".join(lines)


@holding_lock
def run_mine(cfg: MineConfig) -> MineResult:
    data = cfg.load_labelled(cfg.data, cfg.shared_data)  # data first: a bad label fails before the model loads
    side = mining_side(data, cfg.split, cfg.fraction, cfg.seed, cfg.per_class or None)
    out = cfg.output()
    scope = cfg.load_scope(cfg.layer_list())
    control = cfg.load_control(scope.saes)
    # with a control, encoded as `toxicity eval` encodes its mining side (residuals too), and kept for it
    enc = encode_labelled(scope, side, control=control, threshold=cfg.threshold, residual=control is not None,
                          activations=True, batch_size=cfg.batch_size)
    source = {"data": cfg.data if side.language or not Path(cfg.data).is_file() else str(Path(cfg.data).resolve()),
              "columns": {"text": cfg.text_column, "label": cfg.label_column, "group": cfg.group_column},
              "split": cfg.split, "fraction": cfg.fraction, "seed": cfg.seed, "data_hash": data.content_hash(),
              "per_class": cfg.per_class or None, "split_rule": split_rule(data) if cfg.split == "mine" else "none"}
    rules = make_ruleset(enc.hits["sae"], side, scope.saes, model=scope.lm.name, sae=str(cfg.sae), ks=sorted(set(cfg.rule_k)),
                         threshold=cfg.threshold, mining=source, folds=cfg.folds, model_dtype=DTYPE_NAMES[scope.lm.dtype])
    if control is not None and cfg.folds > 1:
        cv = cross_validated(enc.hits["control"], side.labels, sorted(set(cfg.rule_k)), folds=cfg.folds)
        if cv is not None:
            rules.choice["cv_balanced_accuracy_control"] = cv
    rules.save(out)
    if control is not None:
        save_encoded(encoded_path(out), enc, encoded_key(scope, control, side, cfg.threshold, cfg.batch_size))
    return MineResult(out, rules, side)


def encoded_path(rules: Path) -> Path:
    """Where `toxicity mine --control` keeps the mining side's encoding, beside its rules file."""
    return rules.with_name(f"{rules.stem}.mining-encoded.npz")


def encoded_key(scope: Scope, control: dict[int, SAE] | None, side: LabelledSet, threshold: float, batch_size: int) -> dict:
    """Everything an encoding of `side` depends on: texts and labels, model and dtype, each SAE and control layer by its
    fingerprint, the threshold and the batches (bf16 sums differ in the last bit with how texts are padded together)."""
    return {"data": side.content_hash(), "model": scope.lm.name, "dtype": DTYPE_NAMES[scope.lm.dtype],
            "threshold": threshold, "batch_size": batch_size,
            "sae": {str(n): fingerprint(s) for n, s in sorted(scope.saes.items())},
            "control": {str(n): fingerprint(c) for n, c in sorted((control or {}).items()) if n in scope.saes}}


def rules_saes(rules: RuleSet, sae: str | None, layers: list[int], origin: str) -> tuple[dict[int, SAE], str]:
    """The SAEs of `layers` (those of `sae` when given, else the ones the rules name), checked against the rules (model,
    fingerprints, feature ids) before any model is loaded; and where they are."""
    spec = sae or rules.sae
    saes = load_saes(spec, layers=layers)
    rules.check_saes(saes, spec, None, origin=origin, layers=[n for n in rules.layers if n in layers])
    return saes, spec


@dataclass(kw_only=True)
class RulesDtypeOption(Config):
    """`--model-dtype` of the commands that apply a rules file: by default the dtype the rules were mined in."""

    model_dtype: str | None = config_field(None, "the LM's dtype: fp32, bf16 or auto (default: the one the rules were "
                                           "mined in, in which their scales were read; fp32 for rules files that do not "
                                           "record it)", choices=MODEL_DTYPES)


@dataclass(kw_only=True)
class ClassifyConfig(RulesDtypeOption, SharedDataOption):
    """`saescope toxicity classify`: apply a rule to texts; one audit record per decision."""

    rules: str = config_field(REQUIRED, "the rules file (saescope toxicity mine)")
    texts: str = config_field(REQUIRED, "a text, a file (one text per row), or a built-in labelled set")
    text_column: str | None = config_field(None, "for files: the text column (default: text)")
    label_column: str | None = config_field(None, "for files with labels: print precision/recall/F1 too")
    rule: str | None = config_field(None, "which rule of the file (default: the file's default)")
    sae: str | None = config_field(None, SAE_HELP + " (default: the path the rules file records)")
    store: str | None = config_field(None, "feature store for the audit's evidence (default: SAE/features when present)")
    limit: int | None = config_field(None, "at most this many texts (the first ones of a file; a seeded random sample of a "
                                     "labelled set)", min=1)
    batch_size: int = config_field(32, "texts per batch", min=1)
    max_length: int = config_field(256, "tokens per text (longer ones are cut)", min=1)
    audit: str | None = config_field(None, "JSON lines, one per decision (default: next to the rules, audit.jsonl)",
                                     output="file")

    def output(self) -> Path:
        return Path(self.audit) if self.audit else Path(self.rules).with_name("audit.jsonl")

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class ClassifyResult:
    audit: Path
    rule: str
    n_features: int
    layers: list[int]
    predictions: list[bool]
    seconds: float
    candidate_tokens: int
    tokens: int
    against_labels: dict | None = None

    def text(self) -> str:
        n = len(self.predictions)
        lines = [f"rule {self.rule} ({self.n_features} features on layer(s) {', '.join(map(str, self.layers))}): "
                 f"{sum(self.predictions)} of {n} texts positive; {n / max(self.seconds, 1e-9):.1f} texts/s; full encoder run "
                 f"on {self.candidate_tokens} of {self.tokens} tokens"]
        if self.against_labels is not None:
            s = self.against_labels
            lines.append(f"against the labels: F1 {s['f1']:.3f}, precision {s['precision']:.3f}, recall {s['recall']:.3f}, "
                         f"accuracy {s['accuracy']:.3f}")
        lines.append(f"audit: {self.audit}")
        return "\n".join(lines)


@holding_lock
def run_classify(cfg: ClassifyConfig) -> ClassifyResult:
    rules = RuleSet.load(cfg.rules)
    rule = rules.rule(cfg.rule)
    source = text_source(cfg.texts, text_column=cfg.text_column, label_column=cfg.label_column, limit=cfg.limit,
                         literal=True, param="texts", shared_data=cfg.shared_data)
    labels = source.labelled.labels.tolist() if source.labelled is not None else None
    saes, sae = rules_saes(rules, cfg.sae, rule.layers, cfg.rules)
    scope = Scope(load_model(rules.model, dtype=rules_dtype(cfg.model_dtype, rules)), saes)
    store_path = Path(cfg.store) if cfg.store else RunDir.of_sae(sae).features
    store = FeatureStore(store_path) if (cfg.store or (store_path / "store.json").is_file()) else None
    if store is not None:
        store.check_matches(scope.saes, sae)
    clf = RuleClassifier(scope, rules, cfg.rule, sae_spec=sae, store=store)
    audit = AuditLog(cfg.output(), rules, rule)
    preds: list[bool] = []
    start = time.perf_counter()
    try:
        for d in clf.decisions(source.texts, batch_size=cfg.batch_size, max_length=cfg.max_length, total=source.n):
            audit.write(d)
            preds.append(d.positive)
    except BaseException:
        audit.abandon()
        raise
    audit.close()
    seconds = time.perf_counter() - start
    if audit.path.parent == Path(cfg.rules).parent and audit.path.name == "audit.jsonl":
        write_section(audit.path.parent)
    against = scores(np.array(preds), np.array(labels)) if labels is not None else None
    return ClassifyResult(audit.path, rule.name, len(rule.features), rule.layers, preds, seconds, clf.candidate_tokens,
                          clf.tokens, against)


@dataclass(kw_only=True)
class RulesEvalConfig(RulesDtypeOption, LabelledColumns, ControlOption, SharedDataOption):
    """`saescope toxicity eval`: F1 per language and functionality, beside the control, a residual probe and a lexical
    baseline; F1 against mining fraction; the transfer matrix."""

    rules: str = config_field(REQUIRED, "the rules file (saescope toxicity mine, with split mine)")
    data: str | None = config_field(None, "labelled texts to evaluate on (default: the rules' mining data); " + LABEL_HELP)
    also: list[str] = config_field([], "another labelled set to score the same rules on (its held-out side), beside the "
                                   "same controls and baselines (no curve); repeat it", repeat=True)
    sae: str | None = config_field(None, SAE_HELP + " (default: the path the rules file records)")
    fractions: list[float] = config_field(list(BenchConfig.fractions), "shares of the mining templates for the curve",
                                          min=0, max=1, min_open=True)
    draws: int = config_field(BenchConfig.draws, "random subsets per share below 1", min=1)
    transfer: list[str] | None = config_field(None, "sets for the transfer matrix: built-in sets, 'all' (every "
                                              "Multilingual HateCheck language) or 'natural' (one natural set per "
                                              "language: " + ", ".join(NATURAL_BY_LANGUAGE) + ")")
    batch_size: int = config_field(32, "texts per batch", min=1)
    json: str | None = config_field(None, "results (default: next to the rules, eval.json)", output="file")

    def languages(self) -> list[str]:
        named = {"all": list(MHC_LANGUAGES), "natural": list(NATURAL_BY_LANGUAGE)}
        langs = [v for x in self.transfer or [] if x.strip() for v in named.get(x.strip(), [x.strip()])]
        for lang in langs:
            if not builtin_name(lang):
                raise ParamError(f"{{}}: unknown set {escape(repr(lang))}; built-in: {', '.join(MHC_LANGUAGES)}, "
                                 f"{', '.join(NATURAL)}, all, natural", "transfer")
        return langs

    def output(self) -> Path:
        return Path(self.json) if self.json else Path(self.rules).with_name("eval.json")

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class RulesEvalResult:
    path: Path
    result: dict
    section: Path | None = None
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [format_benchmark(self.result)]
        parts += [format_benchmark(other) for other in self.result.get("also", {}).values()]
        if "transfer" in self.result:
            parts.append(format_transfer(self.result["transfer"]))
        parts.append(f"toxicity eval: {self.path}")
        if self.section:
            parts.append(f"report section: {self.section}")
        return "\n".join(parts)


@holding_lock
def run_rules_eval(cfg: RulesEvalConfig) -> RulesEvalResult:
    rules = RuleSet.load(cfg.rules)
    langs = cfg.languages()
    bench = BenchConfig(ks=tuple(sorted({r.k for r in rules.rules})), fractions=tuple(cfg.fractions), draws=cfg.draws,
                        seed=rules.mining["seed"])
    source = rules.mining["data"]
    if rules.mining["split"] != "mine":
        raise SaescopeError(f"{cfg.rules} was mined on all of {source}: mine with split mine for an evaluation on held-out "
                            "templates")
    layers = sorted(int(n) for n in rules.choice["layer_best_delta"])
    saes, sae = rules_saes(rules, cfg.sae, layers, cfg.rules)
    cols = rules.mining["columns"]
    mining_data = load_labelled(source, text_column=cols.get("text"), label_column=cols.get("label"),
                                group_column=cols.get("group"), shared_data=cfg.shared_data)
    if mining_data.content_hash() != rules.mining["data_hash"]:
        raise SaescopeError(f"the mining data {source} has changed since the rules were mined (its hash differs)")
    scope = Scope(load_model(rules.model, dtype=rules_dtype(cfg.model_dtype, rules)), saes)
    control = cfg.load_control(scope.saes)

    def encode(ds: LabelledSet):
        return encode_labelled(scope, ds, control=control, threshold=rules.threshold, activations=True,
                               batch_size=cfg.batch_size)

    held_out = group_split(mining_data, seed=bench.seed)[1]
    mine_side = mining_side(mining_data, "mine", 1.0, bench.seed, rules.mining.get("per_class"))
    # `mine --control` kept this side's encoding: used when everything it depends on is the same
    mine_enc = (load_encoded(encoded_path(Path(cfg.rules)), mine_side,
                             encoded_key(scope, control, mine_side, rules.threshold, cfg.batch_size))
                or encode(mine_side))
    same = not cfg.data or cfg.data == source or (builtin_name(source) is not None and builtin_name(cfg.data) == builtin_name(source))
    held_enc = encode(held_out) if same or langs else None
    target_data = None if same else cfg.load_labelled(cfg.data, cfg.shared_data)
    target_enc = held_enc if target_data is None else encode(group_split(target_data, seed=bench.seed)[1])
    mined = mine_each(mine_enc, bench)
    result = benchmark(mine_enc, target_enc, bench, rules=rules.rules, mined=mined)
    loaded = [mining_data, *([target_data] if target_data is not None else [])]
    for spec in cfg.also:
        other = cfg.load_labelled(spec, cfg.shared_data)
        loaded.append(other)
        scored = benchmark(mine_enc, encode(group_split(other, seed=bench.seed)[1]), bench, rules=rules.rules, curve=False,
                           mined=mined)
        result.setdefault("also", {})[other.name] = {**scored, "split": f"held out: {split_rule(other)}"}
    warned = check_definitions(loaded)
    result.update(rules=str(cfg.rules), sae=sae, control_path=cfg.control, model=scope.lm.name,
                  model_dtype=DTYPE_NAMES[scope.lm.dtype])
    if langs:
        sides = {_side_name(mining_data): (mine_enc, held_enc)}
        for lang in langs:
            name = _side_name(load := load_labelled(lang, shared_data=cfg.shared_data))
            if name not in sides:
                loaded.append(load)
                sides[name] = (encode(mining_side(load, "mine", 1.0, bench.seed, rules.mining.get("per_class"))),
                               encode(group_split(load, seed=bench.seed)[1]))
        result["transfer"] = transfer_matrix(sides, bench, {_side_name(mining_data): mined})
        warned = check_definitions(loaded) or warned
    result["split"] = f"held out: {split_rule(target_data if target_data is not None else mining_data)}"
    if warned:
        result["warning"] = warned
        warnings.warn(warned, stacklevel=2)
    out = cfg.output()
    atomic_write_json(out, result)
    section = None
    if out.parent.resolve() == Path(cfg.rules).parent.resolve():  # the run's report reads the rules' folder
        section = write_section(out.parent) if out.name == "eval.json" else write_eval_section(out)
    return RulesEvalResult(out, result, section)


def _side_name(data: LabelledSet) -> str:
    """A set's row and column name in the transfer matrix: its Multilingual HateCheck language, or its name."""
    return data.name.removeprefix("mhc_") if data.name.startswith("mhc_") else ("english" if data.name == "hatecheck_en"
                                                                                else data.name)
