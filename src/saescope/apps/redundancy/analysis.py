"""From footprints to the redundancy report, and its check against performance data.

    analyse(fp)                          R_hat per benchmark and layer (with a band over random orders), the
                                         asymmetric and symmetric overlap matrices per layer, size-matched
                                         overlaps at one layer, "A is X% inside B" statements, what to drop
    compare(result, perf, scores)        Spearman(R_hat, R) with a permutation p-value; feature overlap of
                                         benchmark pairs against the correlation of their scores across models
    load_result(path)                    redundancy.json, checked against what compare reads
Every figure is computed for the trained SAEs and, when the footprints have one, for the random control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saescope.apps.redundancy.footprint import Footprints
from saescope.apps.redundancy.metrics import (
    coverage_curves,
    overlap,
    partial_corr,
    pearson,
    performance_curve,
    permutation_pvalue,
    r_hat,
    r_perf,
    size_matched_overlaps,
    spearman,
    symmetric_overlap,
)
from saescope.apps.redundancy.performance import SLOTH_HEADLINE, BenchScores, Correctness, bench_scores
from saescope.core.errors import SaescopeError
from saescope.core.files import read_json
from saescope.core.io import decoder_cos_to_init
from saescope.core.schema import Field, InputError, check_record


def default_layer(fp: Footprints) -> int:
    return fp.layers[len(fp.layers) // 2]


def _band(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "p5": float(np.percentile(x, 5)), "p95": float(np.percentile(x, 95))}


def analyse(fp: Footprints, *, layer: int | None = None, repeats: int = 100, matched_repeats: int = 20,
            subsume: float = 0.6, seed: int = 0, progress: bool = True) -> dict:
    layer = default_layer(fp) if layer is None else layer
    if layer not in fp.layers:
        raise SaescopeError(f"layer {layer} is not in the footprints (have {fp.layers})")
    benches = fp.benchmarks
    if len(benches) < 2:
        raise SaescopeError(f"overlaps need at least 2 benchmarks; {fp.path} has {len(benches)}")
    out: dict = {"layer": layer, "benchmarks": benches, "n_prompts": {b: fp.meta["benchmarks"][b]["n"] for b in benches},
                 "pool": fp.meta["pool"], "sae": fp.meta["sae"], "control": fp.meta.get("control"), "sets": {}}
    for which in ["sae"] + (["control"] if fp.has_control else []):
        per_layer = {}
        for n in tqdm(fp.layers, desc=f"redundancy ({which})", disable=not progress):
            sets = {b: fp.sets(b, n, which) for b in benches}
            unions = {b: s.union() for b, s in sets.items()}
            rh, curves = {}, {}
            for b, s in sets.items():
                c = coverage_curves(s, n_repeats=repeats if n == layer else max(repeats // 5, 10), seed=seed)
                rh[b] = _band(r_hat(c))
                if n == layer:
                    grid = np.unique(np.linspace(0, len(s) - 1, min(len(s), 100)).round().astype(int))
                    curves[b] = {"n": (grid + 1).tolist(), "c": c.mean(0)[grid].tolist()}
            entry = {"footprint": {b: int(u.sum()) for b, u in unions.items()}, "r_hat": rh,
                     "overlap": [[overlap(unions[a], unions[b]) for b in benches] for a in benches],
                     "symmetric": [[symmetric_overlap(unions[a], unions[b]) for b in benches] for a in benches]}
            if n == layer:
                entry["coverage"] = curves
                entry["matched"] = _matched(sets, benches, matched_repeats, seed)
            per_layer[str(n)] = entry
        out["sets"][which] = per_layer
    if fp.has_control:
        out["control_agreement"] = _control_agreement(out)
    out["decoder_cos_to_init"] = decoder_cos_to_init(Path(fp.meta["sae"]))
    out["statements"], out["drop"], out["mutual"] = _statements(out, subsume)
    out["subsume_threshold"] = subsume
    return out


def _control_agreement(res: dict) -> dict:
    """Per layer, how closely the random control reproduces the trained SAEs' figures: Pearson of the
    off-diagonal overlaps, Spearman of R_hat over benchmarks. Near 1, the SAE is not what the figures measure."""
    nb = len(res["benchmarks"])
    off = ~np.eye(nb, dtype=bool)
    out = {}
    for n, e in res["sets"]["sae"].items():
        c = res["sets"]["control"][n]
        out[n] = {"overlap_pearson": pearson(np.array(e["overlap"])[off], np.array(c["overlap"])[off]),
                  "r_hat_spearman": spearman(np.array([e["r_hat"][b]["mean"] for b in res["benchmarks"]]),
                                             np.array([c["r_hat"][b]["mean"] for b in res["benchmarks"]]))}
    return out


def _matched(sets: dict, benches: list[str], repeats: int, seed: int) -> dict:
    nb = len(benches)
    inside, sym = np.full((nb, nb), np.nan), np.full((nb, nb), np.nan)
    inside_sd, sizes = np.full((nb, nb), np.nan), np.zeros((nb, nb), dtype=int)
    for i in range(nb):
        for j in range(i + 1, nb):
            m = size_matched_overlaps(sets[benches[i]], sets[benches[j]], n_repeats=repeats, seed=seed)
            inside[i, j], inside[j, i] = m["a_in_b"].mean(), m["b_in_a"].mean()
            inside_sd[i, j], inside_sd[j, i] = m["a_in_b"].std(), m["b_in_a"].std()
            sym[i, j] = sym[j, i] = m["symmetric"].mean()
            sizes[i, j] = sizes[j, i] = min(len(sets[benches[i]]), len(sets[benches[j]]))
    np.fill_diagonal(inside, 1.0)
    np.fill_diagonal(sym, 1.0)
    return {"overlap": _nan_none(inside), "overlap_sd": _nan_none(inside_sd), "symmetric": _nan_none(sym),
            "prompts": sizes.tolist()}


def _nan_none(m: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in m]


def _statements(res: dict, subsume: float, margin: float = 0.05) -> tuple[list[dict], list[dict], list[dict]]:
    """All "A is X% inside B" statements (size-matched), those that say A can be dropped (A inside B above the
    threshold and clearly more than B inside A), and near-duplicate pairs (both directions above it)."""
    benches, layer = res["benchmarks"], str(res["layer"])
    sae = res["sets"]["sae"][layer]
    ctl = res["sets"].get("control", {}).get(layer)
    rows = []
    for i, a in enumerate(benches):
        for j, b in enumerate(benches):
            if i == j or sae["matched"]["overlap"][i][j] is None:
                continue
            rows.append({"a": a, "b": b, "matched": sae["matched"]["overlap"][i][j], "matched_sd": sae["matched"]["overlap_sd"][i][j],
                         "matched_prompts": sae["matched"]["prompts"][i][j], "raw": sae["overlap"][i][j],
                         "reverse_matched": sae["matched"]["overlap"][j][i],
                         "control_matched": ctl["matched"]["overlap"][i][j] if ctl else None,
                         "text": f"{a} is {100 * sae['matched']['overlap'][i][j]:.0f}% inside {b} (size-matched, "
                                 f"{sae['matched']['prompts'][i][j]} prompts each; raw {100 * sae['overlap'][i][j]:.0f}%)"})
    rows = [r for r in rows if r["matched"] is not None]  # a benchmark with an empty footprint has no overlap to state
    rows.sort(key=lambda r: -r["matched"])
    drop = [r for r in rows if r["matched"] >= subsume and r["matched"] >= r["reverse_matched"] + margin]
    mutual = [r for r in rows if r["a"] < r["b"] and min(r["matched"], r["reverse_matched"]) >= subsume]
    return rows, drop, mutual


# --- performance side -------------------------------------------------------------------------------


def perf_redundancy(c: Correctness, *, repeats: int = 50, seed: int = 0, max_sizes: int = 200) -> dict:
    n = c.matrix.shape[1]
    sizes = np.unique(np.linspace(1, n, min(n, max_sizes)).round().astype(int))
    sizes, tau = performance_curve(c.matrix, n_repeats=repeats, seed=seed, sizes=sizes)
    return {"benchmark": c.benchmark, "granularity": c.granularity, "models": len(c.models), "items": n,
            "r": _band(r_perf(sizes, tau)), "tau_n": {"n": sizes.tolist(), "tau": tau.mean(0).tolist()}, "notes": c.notes}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_matrix(m: Any, n: int) -> bool:
    return isinstance(m, list) and len(m) == n and all(
        isinstance(row, list) and len(row) == n and all(v is None or _is_number(v) for v in row) for row in m)


def check_result(res: Any, origin: str) -> dict:
    """A redundancy.json as compare() reads it: every field it uses, with its type and shape."""
    names = lambda b: None if all(isinstance(x, str) for x in b) and len(set(b)) == len(b) >= 2 else "must list two or more distinct names"  # noqa: E731
    check_record(res, {"layer": Field(int), "benchmarks": Field(list, check=names),
                       "sets": Field(dict, check=lambda s: None if "sae" in s else "has no 'sae' entry")}, origin)
    benches, layer = res["benchmarks"], str(res["layer"])
    nb = len(benches)
    matrix = lambda m: None if _is_matrix(m, nb) else f"must be a {nb} x {nb} matrix of numbers"  # noqa: E731
    r_hat = lambda r: next((f"has no number {b}.mean" for b in benches if not (isinstance(r.get(b), dict)  # noqa: E731
                                                                               and _is_number(r[b].get("mean")))), None)
    for which, per_layer in res["sets"].items():
        if not isinstance(per_layer, dict) or layer not in per_layer:
            raise InputError(f"{origin}: field 'sets.{which}' must be an object with an entry for layer {layer}")
        for n, e in per_layer.items():
            check_record(e, {"r_hat": Field(dict, check=r_hat), "symmetric": Field(list, check=matrix)}, f"{origin}: sets.{which}.{n}")
        check_record(per_layer[layer], {"matched": Field(dict)}, f"{origin}: sets.{which}.{layer}")
        check_record(per_layer[layer]["matched"], {"symmetric": Field(list, check=matrix)}, f"{origin}: sets.{which}.{layer}.matched")
    return res


def load_result(path: Path) -> dict:
    """redundancy.json, checked: a missing, corrupt or incomplete file is one line naming the field."""
    if not path.is_file():
        raise SaescopeError(f"no {path}: run saescope redundancy report {path.parent} first")
    return check_result(read_json(path), str(path))


def compare(res: dict, perf: list[dict], *, scores: BenchScores | None = None, n_perm: int = 10_000) -> dict:
    """Spearman(R_hat, R) over the benchmarks that have both, and pairwise overlap vs score correlation
    (`scores`: per-model scores of the footprinted benchmarks, default: the leaderboard table's)."""
    layer = str(res["layer"])
    out: dict = {"layer": res["layer"], "r_vs_rhat": {}, "pairs": {}}
    have = [p for p in perf if p["benchmark"] in res["benchmarks"]]
    missing = [p["benchmark"] for p in perf if p["benchmark"] not in res["benchmarks"]]
    out["r_vs_rhat_missing"] = missing
    for which, per_layer in res["sets"].items():
        if len(have) >= 3:
            r = np.array([p["r"]["mean"] for p in have])
            rh = np.array([per_layer[layer]["r_hat"][p["benchmark"]]["mean"] for p in have])
            by_layer = {n: spearman(np.array([e["r_hat"][p["benchmark"]]["mean"] for p in have]), r) for n, e in per_layer.items()}
            out["r_vs_rhat"][which] = {"benchmarks": [p["benchmark"] for p in have], "granularity": [p["granularity"] for p in have],
                                       "R": r.tolist(), "R_hat": rh.tolist(), "spearman": spearman(rh, r),
                                       "p_value": permutation_pvalue(rh, r, n_perm=n_perm), "spearman_by_layer": by_layer}
    scores = scores or bench_scores(res["benchmarks"])
    cols, benches = scores.values, list(scores.values)
    out.update(scores=str(scores.path), score_columns=scores.columns, pairs_benchmarks=benches, notes=list(scores.notes))
    if scores.columns.get("math") == SLOTH_HEADLINE["math"]:
        out["notes"].append("math: the leaderboard column is MATH Level 5; the footprinted prompts are all of MATH")
    mmlu = cols.get("mmlu")
    pairs, dropped, unscored, constant = [], {}, [], []
    for i, a in enumerate(benches):
        for b in benches[i + 1:]:
            x, y = cols[a], cols[b]
            ok = ~np.isnan(x) & ~np.isnan(y)
            if ok.sum() < 3:  # no correlation to speak of: dropped and said, not a NaN that spoils every figure
                unscored.append(f"{a}-{b}")
                continue
            with np.errstate(all="ignore"):
                rp = pearson(x[ok], y[ok])
            if not np.isfinite(rp):  # a score that does not vary over these models correlates with nothing
                constant.append(f"{a}-{b}")
                continue
            dropped[f"{a}-{b}"] = int((~ok).sum())
            row = {"a": a, "b": b, "models": int(ok.sum()), "score_pearson": rp}
            if mmlu is not None and "mmlu" not in (a, b) and (ok3 := ok & ~np.isnan(mmlu)).sum() >= 4:
                with np.errstate(all="ignore"):
                    part = partial_corr(x[ok3], y[ok3], mmlu[ok3])
                if np.isfinite(part):
                    row["score_partial_mmlu"] = part
            pairs.append(row)
    total = len(unscored) + len(constant) + len(pairs)
    if unscored:
        out["notes"].append(f"{len(unscored)} of {total} benchmark pairs dropped: fewer than 3 models "
                            f"have scores on both ({', '.join(unscored[:6])}{', ...' if len(unscored) > 6 else ''})")
    if constant:
        out["notes"].append(f"{len(constant)} of {total} benchmark pairs dropped: a score is the same for every model "
                            f"scored on both, so it has no correlation ({', '.join(constant[:6])}"
                            f"{', ...' if len(constant) > 6 else ''})")
    out["pairs_dropped_unscored"] = unscored
    out["pairs_dropped_constant"] = constant
    if len(pairs) < 3:
        out["notes"].append(f"overlap vs score correlation needs 3 or more scored benchmark pairs; {len(pairs)} here")
        return _no_nan(out)
    out["pair_scores"] = pairs
    out["pair_models_dropped_for_nan"] = dropped
    idx = {b: res["benchmarks"].index(b) for b in benches}
    for which, per_layer in res["sets"].items():
        e = per_layer[layer]
        for kind in ("symmetric", "matched"):
            ov = np.array([(e["symmetric"] if kind == "symmetric" else e["matched"]["symmetric"])[idx[p["a"]]][idx[p["b"]]]
                           for p in pairs], dtype=float)  # None (empty footprint) becomes NaN
            sc = np.array([p["score_pearson"] for p in pairs])
            part = [(o, p["score_partial_mmlu"]) for o, p in zip(ov, pairs) if "score_partial_mmlu" in p]
            po, ps = np.array([o for o, _ in part]), np.array([s for _, s in part])
            out["pairs"][f"{which}/{kind}"] = {
                "overlap": ov.tolist(), "pearson": pearson(ov, sc), "spearman": spearman(ov, sc),
                "p_value_spearman": permutation_pvalue(ov, sc, n_perm=n_perm),
                "n_pairs": len(pairs), "partial_pairs": len(part),
                "pearson_partial_mmlu": pearson(po, ps) if len(part) >= 3 else None,
                "spearman_partial_mmlu": spearman(po, ps) if len(part) >= 3 else None}
    return _no_nan(out)


def _no_nan(x: Any) -> Any:
    """NaN and infinities (a correlation that does not exist) become None: compare.json stays valid JSON."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x
