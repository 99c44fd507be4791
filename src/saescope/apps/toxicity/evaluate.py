"""How good a toxicity rule is, and what it costs against the alternatives, on a template split.

Mining and evaluation texts come from one labelled set split by template (HateCheck's and Multilingual
HateCheck's templ_id): sentences of one template never sit on both sides, so a rule cannot pass by having seen
the evaluation sentence's twin. Beside the SAE rules, always, on the same split:

    control   the random-direction control SAEs through the same mining and rule
    probe     a logistic regression on the mean-pooled residual stream at the rule's layer (no sparsity, no audit)
    lexical   a bag-of-words logistic regression on the mining texts (words, and single CJK characters)
    always positive   every text called positive: the F1 a rule must beat to have learnt anything (HateCheck is
              about 70% hateful, so this alone scores ~0.82)

plus the F1 of rules mined on 10/25/50/100% of the mining templates (several draws each) and the transfer matrix
(mine on one language, evaluate on every other language's evaluation side).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from saescope.api.hits import EncodedSet, scores
from saescope.api.probing import fit_logistic
from saescope.api.rules import DEFAULT_KS, Rule, generic_name, mine_rules
from saescope.core.data.labelled import LabelledSet
from saescope.core.errors import SaescopeError

SPLIT_NOTE = "mining and evaluation split by template: no template has sentences on both sides"


@dataclass(frozen=True)
class BenchConfig:
    ks: tuple[int, ...] = DEFAULT_KS
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    draws: int = 5  # mining subsets per fraction below 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise SaescopeError(f"mining fractions must be in (0, 1], got {list(self.fractions)}")
        if self.draws < 1:
            raise SaescopeError(f"draws must be >= 1, got {self.draws}")


def by_functionality(pred: np.ndarray, data: LabelledSet) -> dict:
    """Per functionality (HateCheck's test categories: negation, counter-speech, reclaimed slurs, spelling...): its
    label, its size and the share of its texts the classifier gets right."""
    out: dict[str, dict] = {}
    for name in sorted(set(data.functionality) - {""}):
        idx = np.array([f == name for f in data.functionality])
        labels = data.labels[idx]
        out[name] = {"n": int(idx.sum()), "label": "positive" if labels.mean() > 0.5 else "negative",
                     "accuracy": float(np.mean(pred[idx] == (labels == 1)))}
    return out


# ---------------------------------------------------------------- baselines

_WORD = re.compile(r"[^\W\d_]+|\d+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def words(text: str) -> list[str]:
    """Lower-cased words; CJK scripts (no spaces) as single characters."""
    out = []
    for w in _WORD.findall(text.lower()):
        out.extend(_CJK.findall(w) if _CJK.search(w) else [w])
    return out


def lexical_baseline(mine: LabelledSet, targets: Sequence[LabelledSet], *, min_count: int = 2) -> list[np.ndarray]:
    """A bag-of-words (presence) logistic regression fit on the mining texts; its predictions on each target."""
    counts = Counter(w for t in mine.texts for w in set(words(t)))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= min_count))}

    def matrix(texts: list[str]) -> torch.Tensor:
        x = torch.zeros(len(texts), max(len(vocab), 1), dtype=torch.float64)
        for row, t in enumerate(texts):
            cols = [vocab[w] for w in set(words(t)) if w in vocab]
            x[row, cols] = 1.0
        return x

    probe = fit_logistic(matrix(mine.texts), torch.as_tensor(mine.labels))
    return [(probe.scores(matrix(t.texts))[:, 0] > 0).numpy() for t in targets]


def residual_probe(mine: EncodedSet, targets: Sequence[EncodedSet], layer: int) -> list[np.ndarray]:
    """A logistic regression on the mean-pooled residual stream at `layer`, fit on the mining side."""
    probe = fit_logistic(mine.residual[layer].double(), torch.as_tensor(mine.data.labels))
    return [(probe.scores(t.residual[layer].double())[:, 0] > 0).numpy() for t in targets]


# ---------------------------------------------------------------- the benchmark


def _rule_scores(rules: list[Rule], target: EncodedSet, name: str) -> dict:
    return {r.name: scores(r.predict(target.hits[name]), target.data.labels) for r in rules}


def group_subset(data: LabelledSet, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A mask keeping `fraction` of the groups (templates), drawn with `rng`; at least one group."""
    groups = sorted(set(data.groups))
    keep = set(rng.permutation(len(groups))[: max(1, math.ceil(fraction * len(groups)))].tolist())
    chosen = {groups[i] for i in keep}
    return np.array([g in chosen for g in data.groups])


# Each SAE set's rules ("sae", "control"...) mined on the whole mining side, with what their choice saw (mine_rules).
Mined = dict[str, tuple[list[Rule], dict]]


def mine_each(mine: EncodedSet, cfg: BenchConfig) -> Mined:
    """The rules of every SAE set on the whole mining side: mined once, and scored on every target (a mine of 4,000
    tweets over every rule family took ~3 s; `toxicity eval` with two --also sets mined the same rules eight times)."""
    return {name: mine_rules(mine.hits[name], mine.data.labels, cfg.ks, origin=mine.data.name) for name in mine.hits}


def mining_curve(mine: EncodedSet, target: EncodedSet, cfg: BenchConfig, name: str = "sae",
                 whole: list[Rule] | None = None) -> dict:
    """Per fraction of the mining templates: the F1 and balanced accuracy on `target` of each rule re-mined on the
    subset (mean, min, max over cfg.draws draws; one draw at 100%: `whole` when given, the rules of the whole side), with
    the layer re-chosen on the subset."""
    out: dict[str, dict] = {}
    rng = np.random.default_rng(cfg.seed)
    for fraction in cfg.fractions:
        f1s: dict[str, list[float]] = {}
        baccs: dict[str, list[float]] = {}
        skipped = 0
        for _ in range(1 if fraction >= 1 else cfg.draws):
            if fraction >= 1 and whole is not None:
                rules = whole
            else:
                mask = group_subset(mine.data, fraction, rng) if fraction < 1 else np.ones(len(mine.data), dtype=bool)
                sub = mine.subset(mask)
                try:
                    rules, _ = mine_rules(sub.hits[name], sub.data.labels, cfg.ks, origin=sub.data.name)
                except SaescopeError:  # a small draw with too few texts of a class for the largest K
                    skipped += 1
                    continue
            for r in rules:
                got = scores(r.predict(target.hits[name]), target.data.labels)
                f1s.setdefault(generic_name(r.name), []).append(got["f1"])
                baccs.setdefault(generic_name(r.name), []).append(got["balanced_accuracy"])
        summary = lambda per: {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),  # noqa: E731
                                   "draws": len(v)} for k, v in per.items()}
        out[str(fraction)] = {"n_texts": int(round(fraction * len(mine.data))), "skipped_draws": skipped,
                              "f1": summary(f1s), "balanced_accuracy": summary(baccs)}
    return out


def benchmark(mine: EncodedSet, target: EncodedSet, cfg: BenchConfig, *, rules: list[Rule] | None = None,
              curve: bool = True, mined: Mined | None = None) -> dict:
    """The rules (mined on `mine` unless given) on `target`, beside the control's rules, the residual probe and the
    lexical baseline; per functionality for every rule; and (with `curve`) the mining-fraction curve. `mined`: what
    mine_each gives, for a caller that scores several targets."""
    out: dict = {"split": SPLIT_NOTE, "mining": {"source": mine.data.name, "n_texts": len(mine.data)},
                 "evaluation": {"source": target.data.name, "n_texts": len(target.data)}, "sets": {}}
    mined = mined if mined is not None else mine_each(mine, cfg)
    for name in mine.hits:
        own, choice = mined[name]
        use = rules if (rules is not None and name == "sae") else own
        preds = {r.name: r.predict(target.hits[name]) for r in use}
        out["sets"][name] = {"choice": choice, "rules": {r.name: {"kind": r.kind, "k": r.k, "features":
                                                                    [[f.layer, f.feature, round(f.delta, 4)] for f in r.features],
                                                                    **scores(preds[r.name], target.data.labels),
                                                                    "functionality": by_functionality(preds[r.name], target.data)}
                                                       for r in use}}
    layer = out["sets"]["sae"]["choice"]["chosen_layer"]
    probe = residual_probe(mine, [target], layer)[0] if mine.residual else None
    lexical = lexical_baseline(mine.data, [target.data])[0]
    out["baselines"] = {"lexical": {**scores(lexical, target.data.labels), "functionality": by_functionality(lexical, target.data)},
                        # what calling every text positive scores: on HateCheck (about 70% hateful) an F1 of ~0.82
                        "always positive": scores(np.ones(len(target.data), dtype=bool), target.data.labels)}
    if probe is not None:
        out["baselines"]["probe"] = {"layer": layer, **scores(probe, target.data.labels),
                                     "functionality": by_functionality(probe, target.data)}
    if curve:
        out["curve"] = {name: mining_curve(mine, target, cfg, name, mined[name][0]) for name in mine.hits}
    return out


def transfer_matrix(sides: dict[str, tuple[EncodedSet, EncodedSet]], cfg: BenchConfig,
                    mined: dict[str, Mined] | None = None) -> dict:
    """sides: per language, (mining side, evaluation side). Rules (and the baselines) mined on each language's
    mining side, scored on every language's evaluation side: {set: {source: {target: {rule kind-K: F1}}}}. `mined`:
    per language, what mine_each already gave for its mining side."""
    out: dict[str, dict] = {}
    langs = list(sides)
    for source in langs:
        mine = sides[source][0]
        targets = [sides[t][1] for t in langs]
        layer = None
        own = (mined or {}).get(source) or mine_each(mine, cfg)
        for name in mine.hits:
            rules, choice = own[name]
            if name == "sae":
                layer = choice["chosen_layer"]  # the probe reads the SAE rule's layer
            row = out.setdefault(name, {}).setdefault(source, {})
            for t, enc in zip(langs, targets, strict=True):
                got = {generic_name(r.name): scores(r.predict(enc.hits[name]), enc.data.labels) for r in rules}
                row[t] = {"f1": {k: v["f1"] for k, v in got.items()},
                          "balanced_accuracy": {k: v["balanced_accuracy"] for k, v in got.items()},
                          "chosen_layer": choice["chosen_layer"]}
        if mine.residual and layer is not None:
            for t, pred in zip(langs, residual_probe(mine, targets, layer), strict=True):
                out.setdefault("probe", {}).setdefault(source, {})[t] = _two(scores(pred, sides[t][1].data.labels))
        for t, pred in zip(langs, lexical_baseline(mine.data, [e.data for e in targets]), strict=True):
            out.setdefault("lexical", {}).setdefault(source, {})[t] = _two(scores(pred, sides[t][1].data.labels))
    out["always positive"] = {t: _two(scores(np.ones(len(sides[t][1].data), dtype=bool), sides[t][1].data.labels))
                              for t in langs}
    out["sizes"] = {t: {side: {"texts": len(enc.data), "positive": int(np.count_nonzero(enc.data.labels == 1))}
                        for side, enc in zip(("mine", "held_out"), sides[t], strict=True)} for t in langs}
    out["definitions"] = {t: sides[t][1].data.definition for t in langs}
    out["languages"] = {t: sides[t][1].data.language for t in langs}
    out["by_definition"] = by_definition(out)
    if split := by_language_and_definition(out):
        out["by_language_and_definition"] = split
    return out


def by_definition(matrix: dict) -> dict:
    """Mean balanced accuracy over the transfer pairs (source != target) whose sets label the same thing as positive
    ("same") and over those whose labels differ ("different"), per rule for the SAE and control, for the probe and
    the bag of words: whether a rule transfers follows the labels as much as the languages. Sets of unknown
    definition take part in neither."""
    known = {t: d for t, d in matrix["definitions"].items() if d}
    return {group: _pair_means(matrix, [(s, t) for s in known for t in known if s != t and (known[s] == known[t]) == same])
            for group, same in (("same", True), ("different", False))}


def by_language_and_definition(matrix: dict) -> dict:
    """by_definition's pairs split again by whether the two sets share their language: {"same definition, other
    language": ..., ...}. Only where some pair shares a language (two sets of one language in the matrix), since that
    is what separates a rule's language from its labels; else {}. Sets of unknown language or definition take part
    in none."""
    languages = matrix.get("languages", {})
    known = {t: (d, languages.get(t)) for t, d in matrix["definitions"].items() if d and languages.get(t)}
    pairs = [(s, t) for s in known for t in known if s != t]
    if not any(known[s][1] == known[t][1] for s, t in pairs):
        return {}
    return {f"{d} definition, {lang} language": _pair_means(matrix, [
        (s, t) for s, t in pairs if (known[s][0] == known[t][0]) == same_d and (known[s][1] == known[t][1]) == same_l])
        for d, same_d in (("same", True), ("different", False)) for lang, same_l in (("same", True), ("other", False))}


def _pair_means(matrix: dict, pairs: list[tuple[str, str]]) -> dict:
    """The pairs' count and mean balanced accuracy per rule (SAE, control) and per baseline (probe, bag of words)."""
    row: dict = {"pairs": len(pairs)}
    if pairs:
        for name in ("sae", "control"):
            if name in matrix:
                rules = matrix[name][pairs[0][0]][pairs[0][1]]["balanced_accuracy"]
                row[name] = {r: float(np.mean([matrix[name][s][t]["balanced_accuracy"][r] for s, t in pairs]))
                             for r in rules}
        for name in ("probe", "lexical"):
            if name in matrix:
                row[name] = float(np.mean([matrix[name][s][t]["balanced_accuracy"] for s, t in pairs]))
    return row


def _two(s: dict) -> dict:
    return {"f1": s["f1"], "balanced_accuracy": s["balanced_accuracy"]}


# ---------------------------------------------------------------- tables


def format_benchmark(result: dict) -> str:
    lines = [f"toxicity rules: mined on {result['mining']['source']} ({result['mining']['n_texts']} texts), evaluated on "
             f"{result['evaluation']['source']} ({result['evaluation']['n_texts']} texts); {result['split']}",
             f"{'rule':<16} {'F1':>6} {'prec':>6} {'recall':>6} {'acc':>6} {'bal.acc':>7}   {'control F1':>10} {'bal.acc':>7}"]
    sae, control = result["sets"]["sae"], result["sets"].get("control")
    ctl = {generic_name(n): v for n, v in control["rules"].items()} if control else {}
    for name, r in sae["rules"].items():
        c = ctl.get(generic_name(name))
        lines.append(f"{name:<16} {r['f1']:6.3f} {r['precision']:6.3f} {r['recall']:6.3f} {r['accuracy']:6.3f} "
                     f"{r['balanced_accuracy']:7.3f}   " + (f"{c['f1']:10.3f} {c['balanced_accuracy']:7.3f}" if c else f"{'-':>10}"))
    for name, b in result["baselines"].items():
        label = f"{name} (L{b['layer']})" if "layer" in b else name
        lines.append(f"{label:<16} {b['f1']:6.3f} {b['precision']:6.3f} {b['recall']:6.3f} {b['accuracy']:6.3f} "
                     f"{b['balanced_accuracy']:7.3f}")
    lines.append(f"layer chosen by top1-diff: {sae['choice']['chosen_layer']}"
                 + (f" (control: {control['choice']['chosen_layer']})" if control else ""))
    if "curve" not in result:
        return "\n".join(lines)
    curve = result["curve"]["sae"]
    kinds = list(next(iter(curve.values()))["f1"])
    for metric in ("f1", "balanced_accuracy"):
        lines.append(f"{metric.replace('_', ' ')} against the share of mining templates used (mean over draws; "
                     f"{'/'.join(kinds)}): " + "  ".join(f"{float(frac):.0%}: " + "/".join(
                         f"{c[metric][k]['mean']:.3f}" for k in kinds if k in c[metric]) for frac, c in curve.items()))
    return "\n".join(lines)


def label_definitions(matrix: dict) -> str:
    """Each set of a transfer matrix with what it labels positive ("?" where unknown), on one line."""
    return ", ".join(f"{t}: {d or '?'}" for t, d in matrix.get("definitions", {}).items())


def format_transfer(matrix: dict, rules: tuple[str, ...] = ("layer-k5", "sparse-k5", "weighted-k5", "mean-k5", "both-k5")
                    ) -> str:
    sae = matrix["sae"]
    langs = list(sae)
    short = {lang: lang[:7] for lang in langs}
    header = f"{'':>8} " + " ".join(f"{short[t]:>13}" for t in langs)
    lines = []
    if "sizes" in matrix:
        lines.append("texts (positive) mined on / held out: " + "; ".join(
            f"{t} {s['mine']['texts']} ({s['mine']['positive']}) / {s['held_out']['texts']} ({s['held_out']['positive']})"
            for t, s in matrix["sizes"].items()))
    control = matrix.get("control", {})
    for metric in ("f1", "balanced_accuracy"):
        for rule in (r for r in rules if r in sae[langs[0]][langs[0]]["f1"]):
            lines += [f"transfer matrix, {metric.replace('_', ' ')} of the {rule} rule (rows: mined on; columns: "
                      "evaluated on; SAE / control)", header]
            for s in langs:
                cells = [f"{sae[s][t][metric].get(rule, math.nan):6.3f}/"
                         f"{control.get(s, {}).get(t, {}).get(metric, {}).get(rule, math.nan):6.3f}" for t in langs]
                lines.append(f"{short[s]:>8} " + " ".join(f"{x:>13}" for x in cells))
        lines.append(f"baselines, {metric.replace('_', ' ')} (rows mined on, columns evaluated on)")
        for base in (b for b in ("probe", "lexical") if b in matrix):
            for s in langs:
                lines.append(f"{base[:5] + ' ' + short[s]:>8} " + " ".join(f"{matrix[base][s][t][metric]:>13.3f}" for t in langs))
        if "always positive" in matrix:
            lines.append(f"{'always +':>8} " + " ".join(f"{matrix['always positive'][t][metric]:>13.3f}" for t in langs))
    for title, groups in pair_groups(matrix):
        lines.append(f"balanced accuracy of transfer pairs by {title} ({label_definitions(matrix)})")
        for group, g in groups.items():
            cells = [f"{r} {g['sae'][r]:.3f} / {g.get('control', {}).get(r, math.nan):.3f}" for r in rules if r in g.get("sae", {})]
            base = [f"{name} {g[name]:.3f}" for name in ("probe", "lexical") if name in g]
            lines.append(f"  {group} ({g['pairs']} pairs), SAE / control: " + "; ".join(cells + base))
    return "\n".join(lines)


def pair_groups(matrix: dict) -> list[tuple[str, dict]]:
    """The transfer matrix's pair means to show, each as (what groups them, {row label: pair means}), groups
    without pairs left out: by label definition, then by language and definition where the matrix has both."""
    shown = [("label definition", {f"{g} definition": v for g, v in matrix.get("by_definition", {}).items()}),
             ("language and label definition", matrix.get("by_language_and_definition", {}))]
    return [(title, kept) for title, groups in shown if (kept := {g: v for g, v in groups.items() if v.get("pairs")})]
