"""Feature coverage of a dataset, and the smallest subset of a pool that keeps it (Qwen-Scope report, section 6).

    targets    (layer, feature) pairs, each with the class it stands for (positive: seen in harmful text,
               negative: in clean text); from ids, from a mined rules file, or derived from a labelled set
    Cov(D)     the fraction of targets fired (max activation over a text's tokens, the first left out, > 0) by at
               least one example of D
    selection  greedy set cover of the targets over a labelled pool: the example firing the most uncovered
               targets first, until the coverage goal; beside it, random subsets of the same sizes
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saescope.api.hits import EncodedSet, FeatureHits, feature_deltas, scores
from saescope.api.rules import FORMAT as RULES_FORMAT
from saescope.api.rules import RuleSet, mine_rules
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_json, read_json, record_path, resolve_record_path
from saescope.core.io import fingerprint
from saescope.core.sae import SAE
from saescope.core.schema import Field, InputError, check_record, escape

FORMAT = "saescope-feature-targets"
CLASSES = ("positive", "negative")


@dataclass(frozen=True)
class Target:
    layer: int
    feature: int
    label: str = "positive"  # the class whose texts the feature stands for
    why: str = ""


@dataclass
class TargetSet:
    targets: list[Target]
    model: str = ""
    sae: str = ""
    fingerprints: dict[int, str] | None = None

    @property
    def layers(self) -> list[int]:
        return sorted({t.layer for t in self.targets})

    def check_saes(self, saes: dict[int, SAE], sae_spec: str) -> None:
        """Feature ids out of range are refused naming the target; recorded fingerprints must match."""
        for t in self.targets:
            if t.layer not in saes:
                raise SaescopeError(f"target L{t.layer}/{t.feature}: {sae_spec} has no SAE for layer {t.layer}")
            if not 0 <= t.feature < saes[t.layer].cfg.d_sae:
                raise SaescopeError(f"target L{t.layer}/{t.feature}: feature id out of range 0..{saes[t.layer].cfg.d_sae - 1}")
        for n, fp in (self.fingerprints or {}).items():
            if n in saes and fingerprint(saes[n]) != fp:
                raise SaescopeError(f"the targets were chosen on the SAEs {self.sae}, not on {sae_spec} (layer {n} differs)")

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"format": FORMAT, "version": 1, "model": self.model, "sae": record_path(self.sae, path),
                                 "fingerprints": {str(n): f for n, f in sorted((self.fingerprints or {}).items())},
                                 "targets": [vars(t) for t in self.targets]})


_ID = re.compile(r"\s*(\d+)\s*[:/]\s*(\d+)\s*")


def load_targets(spec: str) -> TargetSet:
    """Targets from a targets file, a rules file (every feature of every rule), or ids such as `15:3,15:40`."""
    path = Path(spec)
    if path.is_file():
        obj = read_json(path)
        kind = obj.get("format") if isinstance(obj, dict) else None
        if kind == RULES_FORMAT:
            rules = RuleSet.load(path)
            seen: dict[tuple[int, int], Target] = {}
            for r in rules.rules:
                for f in r.features:
                    seen.setdefault((f.layer, f.feature), Target(f.layer, f.feature, "positive", f"rule {r.name}"))
            return TargetSet(list(seen.values()), rules.model, rules.sae, rules.fingerprints)
        if kind != FORMAT:
            raise InputError(f"{spec}: neither a targets file ({FORMAT}) nor a rules file")
        check_record(obj, {"targets": Field(list), "model": Field(str), "sae": Field(str), "fingerprints": Field(dict),
                           "version": Field(int, min=1, max=1)}, spec)
        targets = []
        for i, t in enumerate(obj["targets"]):
            check_record(t, {"layer": Field(int, min=0), "feature": Field(int, min=0),
                             "label": Field(str, required=False, check=lambda v: None if v in CLASSES else
                                            f"must be one of {', '.join(CLASSES)}"),
                             "why": Field(str, required=False)}, f"{spec}: targets[{i}]")
            targets.append(Target(t["layer"], t["feature"], t.get("label", "positive"), t.get("why", "")))
        if not targets:
            raise InputError(f"{spec}: no targets")
        fps = {int(k): v for k, v in (obj.get("fingerprints") or {}).items() if str(k).isdigit()}
        return TargetSet(targets, obj["model"], resolve_record_path(obj["sae"], path), fps)
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts or not all(_ID.fullmatch(p) for p in parts):
        raise ParamError(f"{{}} {escape(repr(spec[:80]))}: not a file, and not ids such as 15:3,15:40", "targets")
    return TargetSet([Target(int(m.group(1)), int(m.group(2)), "positive", "given")
                      for m in (_ID.fullmatch(p) for p in parts) if m])


def derive_targets(hits: FeatureHits, labels: np.ndarray, *, n: int = 60, rare: float = 0.02, min_texts: int = 2,
                   per_class: bool = True, background: dict[int, np.ndarray] | None = None,
                   max_background: float = 1.0) -> list[Target]:
    """The features a labelled set's positive texts fire that its negative texts rarely do (P(fire | negative) <=
    rare, fired on >= min_texts positives), ranked by P(fire | positive) - P(fire | negative) across layers; with
    per_class, the same for negative texts too (half of n each), so that a selection keeps both classes.
    `background` (per layer, each feature's firing rate per token on general text, e.g. a feature store's
    frequencies) with max_background keeps only features that general text rarely fires: specific to the set."""
    deltas = feature_deltas(hits, labels)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    out: list[Target] = []
    classes = (("positive", 1), ("negative", -1)) if per_class else (("positive", 1),)
    share = n // len(classes)
    for label, sign in classes:
        cands = []
        for layer, (_, p_pos, p_neg) in deltas.items():
            mine, other, count = (p_pos, p_neg, n_pos) if sign > 0 else (p_neg, p_pos, n_neg)
            specific = background[layer] <= max_background if background is not None else True
            ok = np.flatnonzero((other <= rare) & (mine * count >= min_texts) & specific)
            cands += [(float(mine[f] - other[f]), layer, int(f), float(mine[f]), float(other[f])) for f in ok]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        out += [Target(layer, f, label, f"P(fire | {label}) {a:.3f}, other class {b:.3f}") for _, layer, f, a, b in cands[:share]]
    if not out:
        raise SaescopeError("no feature fires on one class while rarely firing on the other (and on general text); "
                            "loosen `rare` or the background rate")
    return out


def target_matrix(hits: FeatureHits, targets: list[Target]) -> np.ndarray:
    """(n_texts, n_targets) bool: which text fires which target."""
    return np.stack([hits.column(t.layer, t.feature) for t in targets], axis=1)


def coverage(fired: np.ndarray) -> dict:
    """Cov = fraction of targets (columns) fired by at least one text (row), and per target its count of texts."""
    counts = fired.sum(0)
    return {"coverage": float((counts > 0).mean()) if fired.shape[1] else 0.0, "covered": int((counts > 0).sum()),
            "n_targets": int(fired.shape[1]), "texts_per_target": counts.astype(int).tolist()}


def greedy_cover(fired: np.ndarray, goal: float = 1.0, times: int = 1) -> list[int]:
    """Rows chosen greedily (most newly covered targets first; ties: the lower row) until `goal` of what the whole
    pool covers is covered `times` times (each target fired by `times` chosen rows, or by all the rows that fire it
    when fewer do)."""
    want = np.minimum(fired.sum(0), times)  # what the pool can give each target
    need = int(np.ceil(goal * want.sum() - 1e-9))
    have = np.zeros(fired.shape[1], dtype=np.int64)
    chosen: list[int] = []
    available = np.ones(len(fired), dtype=bool)
    while np.minimum(have, want).sum() < need:
        gain = (fired & (have < want)).sum(1)
        gain[~available] = -1
        row = int(np.argmax(gain))
        if gain[row] <= 0:
            break
        chosen.append(row)
        available[row] = False
        have += fired[row]
    return chosen


def random_curve(fired: np.ndarray, sizes: list[int], *, draws: int = 20, seed: int = 0) -> dict[int, dict]:
    """Coverage of random subsets of each size: mean, min and max over draws."""
    rng = np.random.default_rng(seed)
    out = {}
    for size in sizes:
        covs = [float(fired[rng.choice(len(fired), size, replace=False)].any(0).mean()) for _ in range(draws)]
        out[size] = {"mean": float(np.mean(covs)), "min": float(np.min(covs)), "max": float(np.max(covs))}
    return out


def selection_study(pool: EncodedSet, held_out: EncodedSet, targets: list[Target], *, goals: tuple[float, ...] = (0.5, 0.8, 0.9, 1.0),
                    times: tuple[int, ...] = (2, 5, 10, 20), ks: tuple[int, ...] = (1, 2, 5, 10), draws: int = 10,
                    seed: int = 0) -> dict:
    """Greedy selections of `pool` reaching each coverage goal of `targets` (then full coverage `times` times over:
    the larger sizes of the curve), beside random subsets of the same size: their coverage, and the F1 and
    balanced accuracy on `held_out` of rules mined on them (against rules mined on the whole pool), per rule kind
    and K (the layer re-chosen on each subset)."""
    fired = target_matrix(pool.hits["sae"], targets)
    rng = np.random.default_rng(seed)

    def rule_f1(mask: np.ndarray) -> dict[str, dict] | None:
        """Per rule kind and K (those the subset has enough texts of each class for): F1 and balanced accuracy."""
        sub = pool.subset(mask)
        fewest = min(sub.data.counts())
        usable = tuple(k for k in ks if k <= fewest)
        try:
            rules, _ = mine_rules(sub.hits["sae"], sub.data.labels, usable, origin=sub.data.name)
        except SaescopeError:  # one class only, or no feature firing more on positives
            return None
        got = {f"{r.kind}-k{r.k}": scores(r.predict(held_out.hits["sae"]), held_out.data.labels) for r in rules}
        return {k: {"f1": v["f1"], "balanced_accuracy": v["balanced_accuracy"]} for k, v in got.items()}

    whole = rule_f1(np.ones(len(pool.data), dtype=bool))
    rows = []
    for goal, repeat in [(g, 1) for g in goals] + [(1.0, t) for t in times]:
        chosen = greedy_cover(fired, goal, repeat)
        mask = np.zeros(len(pool.data), dtype=bool)
        mask[chosen] = True
        rand = []
        for _ in range(draws):
            r = np.zeros(len(pool.data), dtype=bool)
            r[rng.choice(len(pool.data), len(chosen), replace=False)] = True
            rand.append((float(fired[r].any(0).mean()), rule_f1(r)))
        rand_f1: dict[str, dict[str, list[float]]] = {}
        for _, f1 in rand:
            for k, v in (f1 or {}).items():
                for metric, x in v.items():
                    rand_f1.setdefault(k, {}).setdefault(metric, []).append(x)
        rows.append({"goal": goal, "times": repeat, "size": len(chosen), "coverage": float(fired[mask].any(0).mean()),
                     "positives": int(pool.data.labels[mask].sum()), "f1": rule_f1(mask),
                     "random_coverage": float(np.mean([c for c, _ in rand])),
                     "random_f1": {k: {m: float(np.mean(x)) for m, x in v.items()} for k, v in rand_f1.items()},
                     "random_draws_mined": sum(f1 is not None for _, f1 in rand)})
    return {"pool": pool.data.name, "pool_size": len(pool.data), "held_out": held_out.data.name,
            "n_targets": len(targets), "pool_coverage": float(fired.any(0).mean()), "whole_pool_f1": whole,
            "selections": rows}


def format_selection(study: dict, rule: str = "layer-k2") -> str:
    def fmt(got: dict | None) -> str:
        v = (got or {}).get(rule)
        return f"{v['f1']:6.3f} {v['balanced_accuracy']:7.3f}" if v else f"{'-':>6} {'-':>7}"

    lines = [f"selection: greedy cover of {study['n_targets']} targets over {study['pool']} ({study['pool_size']} texts, "
             f"covering {study['pool_coverage']:.1%}); the {rule} rule mined on each subset, scored on {study['held_out']} "
             f"(F1, balanced accuracy); the whole pool: {fmt(study['whole_pool_f1'])}",
             f"{'goal':>5} {'times':>5} {'size':>5} {'coverage':>9} {'F1':>6} {'bal.acc':>7}   {'random cov':>10} {'F1':>6} {'bal.acc':>7}"]
    for r in study["selections"]:
        lines.append(f"{r['goal']:5.2f} {r.get('times', 1):5d} {r['size']:5d} {r['coverage']:9.3f} {fmt(r['f1'])}   "
                     f"{r['random_coverage']:10.3f} {fmt(r['random_f1'] or None)}")
    return "\n".join(lines)
