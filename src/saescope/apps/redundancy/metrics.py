"""The redundancy maths, on feature sets and correctness matrices (numpy only, no models, no I/O).

Definitions (Qwen-Scope technical report, section 4; ../shared/docs/qwen-scope-method.md):
    F(x): the SAE features active on prompt x; F(D) = union of F(x) over the benchmark's prompts.
    c_n = E_S |F(S)| / |F(D)| over random subsets S of n prompts;  R_hat(D) = (1/N) sum_{n=1..N} c_n.
    tau_n = E_S Kendall tau(model ranking by accuracy on S, ranking on all of D);  R(D) = (1/N) sum tau_n.
    overlap(D1 -> D2) = |F(D1) & F(D2)| / |F(D1)|;  symmetric: divided by the smaller footprint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from saescope.core.errors import SaescopeError


@dataclass(frozen=True)
class FeatureSets:
    """The active-feature set of each prompt, in CSR form: prompt i's features are indices[indptr[i]:indptr[i+1]]."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int32
    d_sae: int

    @classmethod
    def from_lists(cls, sets: list[np.ndarray], d_sae: int) -> FeatureSets:
        indptr = np.zeros(len(sets) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sets], out=indptr[1:])
        indices = np.concatenate(sets).astype(np.int32) if sets else np.zeros(0, np.int32)
        return cls(indptr, indices, d_sae)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def rows(self) -> np.ndarray:
        """The prompt of each stored index."""
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))

    def union(self, prompts: np.ndarray | None = None) -> np.ndarray:
        """Boolean (d_sae,) footprint of all prompts, or of the chosen ones."""
        out = np.zeros(self.d_sae, dtype=bool)
        if prompts is None:
            out[self.indices] = True
        else:
            mask = np.zeros(len(self), dtype=bool)
            mask[prompts] = True
            out[self.indices[mask[self.rows()]]] = True
        return out


def coverage_curves(sets: FeatureSets, *, n_repeats: int = 100, seed: int = 0) -> np.ndarray:
    """(n_repeats, N) coverage c_n for n = 1..N, each row from one random order of the prompts.

    The first n prompts of a uniformly random order are a uniformly random n-subset, so one order gives
    c_n for every n: a feature is covered from the position of the first prompt that has it on."""
    n = len(sets)
    if n == 0:
        raise SaescopeError("coverage of an empty benchmark")
    total = int(sets.union().sum())
    rng = np.random.default_rng(seed)
    rows = sets.rows()
    curves = np.zeros((n_repeats, n))
    for r in range(n_repeats):
        rank = np.empty(n, dtype=np.int64)
        rank[rng.permutation(n)] = np.arange(n)
        pos = rank[rows]
        first = np.full(sets.d_sae, n, dtype=np.int64)
        np.minimum.at(first, sets.indices, pos)
        counts = np.bincount(first[first < n], minlength=n)
        curves[r] = np.cumsum(counts) / max(total, 1)
    return curves


def r_hat(curves: np.ndarray) -> np.ndarray:
    """R_hat per repeat: the mean of c_1..c_N (the normalised area under the coverage curve)."""
    return curves.mean(axis=1)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A| for boolean footprints: how much of A lies inside B."""
    na = int(a.sum())
    return float((a & b).sum() / na) if na else float("nan")


def symmetric_overlap(a: np.ndarray, b: np.ndarray) -> float:
    small = min(int(a.sum()), int(b.sum()))
    return float((a & b).sum() / small) if small else float("nan")


def size_matched_overlaps(a: FeatureSets, b: FeatureSets, *, size: int | None = None, n_repeats: int = 20,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """overlap(a -> b), overlap(b -> a) and the symmetric overlap with both sides subsampled to the same
    number of prompts (default: the smaller benchmark's size), repeated: a bigger benchmark has a bigger
    footprint by size alone, which the raw overlaps confound with content."""
    size = min(len(a), len(b)) if size is None else min(size, len(a), len(b))
    rng = np.random.default_rng(seed)
    out = {"a_in_b": np.zeros(n_repeats), "b_in_a": np.zeros(n_repeats), "symmetric": np.zeros(n_repeats)}
    for r in range(n_repeats):
        fa = a.union(rng.choice(len(a), size, replace=False))
        fb = b.union(rng.choice(len(b), size, replace=False))
        out["a_in_b"][r], out["b_in_a"][r], out["symmetric"][r] = overlap(fa, fb), overlap(fb, fa), symmetric_overlap(fa, fb)
    return out


def kendall_tau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between x and each row of y ((m,) and (r, m) -> (r,)); NaN where a side is all ties."""
    y = np.atleast_2d(y)
    iu = np.triu_indices(len(x), 1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, :, None] - y[:, None, :])[:, iu[0], iu[1]]
    num = (sy * sx).sum(1)
    den = np.sqrt(np.abs(sx).sum() * np.abs(sy).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def performance_curve(correct: np.ndarray, *, n_repeats: int = 50, seed: int = 0,
                      sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """tau_n for subset sizes n (default every n = 1..N) from a (models, items) correctness (or score) matrix.

    Returns (sizes, tau) with tau of shape (n_repeats, len(sizes)). A subset on which every model ties
    carries no ranking information and counts as tau = 0 (not dropped: dropping it would flatter small n)."""
    m, n = correct.shape
    if m < 3:
        raise SaescopeError(f"R(D) needs at least 3 models to rank, got {m}: Kendall tau is meaningless below that")
    if n < 2:
        raise SaescopeError(f"R(D) needs at least 2 items, got {n}")
    full = correct.mean(1)
    sizes = np.arange(1, n + 1) if sizes is None else np.asarray(sizes)
    rng = np.random.default_rng(seed)
    tau = np.zeros((n_repeats, len(sizes)))
    for r in range(n_repeats):
        perm = rng.permutation(n)
        prefix = np.cumsum(correct[:, perm], axis=1)  # the first n of a random order: a random n-subset
        sub = (prefix[:, sizes - 1] / sizes).T  # (len(sizes), models)
        tau[r] = np.nan_to_num(kendall_tau(full, sub), nan=0.0)
    return sizes, tau


def r_perf(sizes: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """R(D) per repeat: the mean of tau_n over n = 1..N, interpolated linearly when only some sizes were run."""
    n = int(sizes[-1])
    if len(sizes) == n:
        return tau.mean(1)
    grid = np.arange(1, n + 1)
    return np.array([np.interp(grid, sizes, row).mean() for row in tau])


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_value = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new_value)
    ends = np.r_[starts[1:], len(x)]
    r = np.empty(len(x))
    r[order] = ((starts + 1 + ends) / 2)[np.cumsum(new_value) - 1]  # a run of ties at ranks s+1..e: their mean
    return r


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """NaN when either side has a NaN or no spread (a correlation that does not exist is not 0)."""
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    return pearson(ranks(x), ranks(y))


def permutation_pvalue(x: np.ndarray, y: np.ndarray, stat: Callable[[np.ndarray, np.ndarray], float] = spearman, *,
                       n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided: the share of random pairings at least as extreme as the observed one (counting itself)."""
    obs = abs(stat(x, y))
    if not np.isfinite(obs):
        return float("nan")
    rng = np.random.default_rng(seed)
    if stat in (spearman, pearson):
        # Ranking commutes with permuting, so Spearman is Pearson on ranks; all pairings at once as one product.
        a, b = (ranks(x), ranks(y)) if stat is spearman else (x.astype(float), y.astype(float))
        a, b = a - a.mean(), b - b.mean()
        perms = np.stack([rng.permutation(b) for _ in range(n_perm)])
        stats = np.abs(perms @ a) / np.sqrt((a * a).sum() * (b * b).sum())
        hits = int((stats >= obs - 1e-12).sum())
    else:
        hits = sum(abs(stat(x, rng.permutation(y))) >= obs - 1e-12 for _ in range(n_perm))
    return (hits + 1) / (n_perm + 1)


def residualise(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x minus its least-squares fit on z (with intercept)."""
    a = np.column_stack([np.ones_like(z), z])
    coef, *_ = np.linalg.lstsq(a, x, rcond=None)
    return x - a @ coef


def partial_corr(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Pearson correlation of x and y with z partialled out of both."""
    return pearson(residualise(x, z), residualise(y, z))
