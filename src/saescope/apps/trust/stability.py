"""Seed stability: do two SAEs of the same layer learn the same features? (Song et al. 2025 found many
features change with the seed.)

Features are matched by decoder cosine: the best partner of every feature in each direction, and a
one-to-one assignment by exact greedy matching (pairs taken in decreasing cosine, each feature used
once), which is what the Hungarian method gives on near-permutations and scales to 64K features.
Cosines are computed in chunks of rows, so memory stays O(chunk x d_sae), never d_sae x d_sae.
Activation correlations are computed on a token sample the same way, with one SAE's codes kept sparse.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from saescope.core.errors import SaescopeError
from saescope.core.sae import SAE

THRESHOLDS = (0.5, 0.7, 0.9)


@dataclass
class DecoderMatch:
    best_ab: Tensor  # (n_a,) max cosine of each A feature over B
    best_ab_index: Tensor  # (n_a,) its B partner
    best_ba: Tensor  # (n_b,) max cosine of each B feature over A
    assigned: Tensor  # (n_a,) one-to-one B partner of each A feature, -1 where none is left
    assigned_cos: Tensor  # (n_a,) cosine with that partner, nan where none


def _unit_rows(w: Tensor) -> Tensor:
    return F.normalize(w.detach().float().cpu(), dim=1)


def decoder_match(W_a: Tensor, W_b: Tensor, *, chunk: int = 2048, candidates: int = 8) -> DecoderMatch:
    """Match the rows of two decoders (n_a, d), (n_b, d) by cosine."""
    if W_a.shape[1] != W_b.shape[1]:
        raise SaescopeError(f"decoders of different widths: d_model {W_a.shape[1]} vs {W_b.shape[1]}")
    a, b = _unit_rows(W_a), _unit_rows(W_b)
    n_a, n_b = a.shape[0], b.shape[0]
    m = min(candidates, n_b)
    best_ba = torch.full((n_b,), -2.0)
    cand_val, cand_idx = torch.empty(n_a, m), torch.empty(n_a, m, dtype=torch.long)
    for start in range(0, n_a, chunk):
        sims = a[start : start + chunk] @ b.T
        cand_val[start : start + chunk], cand_idx[start : start + chunk] = sims.topk(m, dim=1)
        best_ba = torch.maximum(best_ba, sims.max(0).values)
    assigned, assigned_cos = _greedy_assign(a, b, cand_val, cand_idx)
    return DecoderMatch(cand_val[:, 0].clone(), cand_idx[:, 0].clone(), best_ba, assigned, assigned_cos)


def _greedy_assign(a: Tensor, b: Tensor, cand_val: Tensor, cand_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Exact greedy one-to-one matching from per-row candidate lists.

    Every unmatched row keeps its best not-yet-tried candidate in a max-heap; the heap's top is then at
    least every pair still possible, so taking it when both sides are free is what greedy over all
    n_a x n_b pairs would do. A row whose candidates are all taken fetches its next best among the free
    columns (one row x n_b product), so the short lists never change the result.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    vals, idxs = cand_val.tolist(), cand_idx.tolist()
    pos = [0] * n_a
    heap = [(-vals[i][0], i, idxs[i][0]) for i in range(n_a)]
    heapq.heapify(heap)
    taken = torch.zeros(n_b, dtype=torch.bool)
    taken_list = [False] * n_b
    assigned = [-1] * n_a
    assigned_cos = [float("nan")] * n_a
    free = n_b
    while heap and free:
        neg, i, j = heapq.heappop(heap)
        if not taken_list[j]:
            taken_list[j] = True
            taken[j] = True
            free -= 1
            assigned[i], assigned_cos[i] = j, -neg
            continue
        pos[i] += 1
        if pos[i] >= len(vals[i]):
            sims = b @ a[i]
            sims[taken] = float("-inf")
            m = min(len(vals[i]), free)
            v, ix = sims.topk(m)
            vals[i], idxs[i], pos[i] = v.tolist(), ix.tolist(), 0
        heapq.heappush(heap, (-vals[i][pos[i]], i, idxs[i][pos[i]]))
    return torch.tensor(assigned), torch.tensor(assigned_cos)


@dataclass
class ActivationMatch:
    alive_a: Tensor  # (n_a,) bool: fired at least once on the sample
    best_corr: Tensor  # (n_a,) max Pearson correlation over B features (nan if dead)
    best_corr_index: Tensor
    assigned_corr: Tensor  # (n_a,) correlation with the decoder-assigned partner (nan if dead or unassigned)
    freq_a: Tensor  # (n_a,) firing frequency on the sample


def _sparse_codes(sae: SAE, x: Tensor, chunk: int = 4096) -> Tensor:
    """(tokens, d_sae) sparse COO matrix of the SAE's codes."""
    rows, cols, vals = [], [], []
    for start in range(0, x.shape[0], chunk):
        code = sae.encode(x[start : start + chunk].to(sae.W_enc.device))
        n, k = code.indices.shape
        rows.append(torch.arange(start, start + n).repeat_interleave(k))
        cols.append(code.indices.reshape(-1).cpu())
        vals.append(code.values.reshape(-1).float().cpu())
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (x.shape[0], sae.cfg.d_sae), check_invariants=False).coalesce()


@torch.no_grad()
def activation_match(sae_a: SAE, sae_b: SAE, x: Tensor, assigned: Tensor, *, chunk: int = 1024) -> ActivationMatch:
    """Pearson correlations between A's and B's feature activations on the tokens x (tokens, d_model)."""
    n = x.shape[0]
    za, zb = _sparse_codes(sae_a, x), _sparse_codes(sae_b, x)
    zb_t = zb.t().coalesce()  # (n_b, tokens)

    def moments(z: Tensor) -> tuple[Tensor, Tensor]:
        d = z.shape[1]
        idx, val = z.indices()[1], z.values()
        s1 = torch.zeros(d).index_add_(0, idx, val)
        s2 = torch.zeros(d).index_add_(0, idx, val * val)
        mean = s1 / n
        return mean, (s2 / n - mean * mean).clamp_min(0).sqrt()

    mean_a, std_a = moments(za)
    mean_b, std_b = moments(zb)
    freq_a = torch.zeros(za.shape[1]).index_add_(0, za.indices()[1], (za.values() > 0).float()) / n
    za_t = za.t().coalesce()  # (n_a, tokens): its rows are sliced per chunk of A features
    rows_a, tokens_a, values_a = za_t.indices()[0], za_t.indices()[1], za_t.values()
    n_a = za.shape[1]
    best = torch.full((n_a,), float("nan"))
    best_idx = torch.full((n_a,), -1, dtype=torch.long)
    paired = torch.full((n_a,), float("nan"))
    for start in range(0, n_a, chunk):
        stop = min(start + chunk, n_a)
        sel = (rows_a >= start) & (rows_a < stop)
        dense_a = torch.zeros(n, stop - start)
        dense_a[tokens_a[sel], rows_a[sel] - start] = values_a[sel]
        cross = (zb_t @ dense_a) / n  # (n_b, chunk): E[b a]
        cov = cross - mean_b[:, None] * mean_a[None, start:stop]
        denom = std_b[:, None] * std_a[None, start:stop]
        corr = torch.where(denom > 0, cov / denom.clamp_min(1e-30), torch.full_like(cov, float("nan")))
        filled = torch.nan_to_num(corr, nan=-2.0)
        v, ix = filled.max(0)
        alive = std_a[start:stop] > 0
        best[start:stop] = torch.where(alive & (v > -2), v, torch.full_like(v, float("nan")))
        best_idx[start:stop] = ix
        partner = assigned[start:stop]
        ok = partner >= 0
        cols = torch.arange(stop - start)
        paired_chunk = torch.full((stop - start,), float("nan"))
        paired_chunk[ok] = corr[partner[ok], cols[ok]]
        paired[start:stop] = paired_chunk
    return ActivationMatch(std_a > 0, best, best_idx, paired, freq_a)


def shares(values: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Share of the (masked) features whose value is at least each threshold; nan counts as below."""
    v = values if mask is None else values[mask]
    if v.numel() == 0:
        return {str(t): float("nan") for t in THRESHOLDS}
    v = torch.nan_to_num(v, nan=-2.0)
    return {str(t): float((v >= t).float().mean()) for t in THRESHOLDS}


def stability_report(sae_a: SAE, sae_b: SAE, x: Tensor | None = None, *, n_unstable: int = 20) -> dict:
    """Every stability figure for one layer, as a JSON-ready dict. x: activations for the correlations."""
    if (sae_a.cfg.d_model, sae_a.cfg.d_sae) != (sae_b.cfg.d_model, sae_b.cfg.d_sae):
        raise SaescopeError(f"SAEs of different shapes: (d_model, d_sae) {(sae_a.cfg.d_model, sae_a.cfg.d_sae)} vs "
                            f"{(sae_b.cfg.d_model, sae_b.cfg.d_sae)}")
    match = decoder_match(sae_a.W_dec, sae_b.W_dec)
    out: dict = {"d_sae": sae_a.cfg.d_sae, "k": [sae_a.cfg.k, sae_b.cfg.k],
                 "decoder": {"max_cos_a_to_b": shares(match.best_ab), "max_cos_b_to_a": shares(match.best_ba),
                             "one_to_one": shares(match.assigned_cos),
                             "mean_max_cos_a_to_b": float(match.best_ab.mean()),
                             "mean_one_to_one": float(torch.nan_to_num(match.assigned_cos, nan=0.0).mean())}}
    act = None
    if x is not None:
        act = activation_match(sae_a, sae_b, x, match.assigned)
        alive = act.alive_a
        out["activations"] = {"tokens": int(x.shape[0]), "alive_a": int(alive.sum()),
                              "max_corr": shares(act.best_corr, alive), "one_to_one_corr": shares(act.assigned_corr, alive)}
    # Unstable: features (alive on the sample, when there is one) whose one-to-one partner is furthest away.
    order_key = torch.nan_to_num(match.assigned_cos, nan=-2.0)
    candidates = torch.arange(sae_a.cfg.d_sae) if act is None else torch.nonzero(act.alive_a).flatten()
    worst = candidates[order_key[candidates].argsort()[:n_unstable]]
    out["unstable"] = [{"feature": int(i), "one_to_one_cos": _num(match.assigned_cos[i]), "partner": int(match.assigned[i]),
                        "max_cos": float(match.best_ab[i]),
                        **({"max_corr": _num(act.best_corr[i]), "freq": float(act.freq_a[i])} if act is not None else {})}
                       for i in worst.tolist()]
    return out


def _num(t: Tensor) -> float | None:
    v = float(t)
    return None if v != v else v


def format_stability(per_layer: dict[int, dict], control: dict[int, dict] | None = None) -> str:
    """Shares of A's features with a B partner at each cosine / correlation threshold, per layer; with a
    control, the same shares against the random control (what chance gives) in the row below."""
    t = [str(x) for x in THRESHOLDS]
    head = (f"{'layer':>5} {'vs':>7} " + " ".join(f"{'cos>=' + x:>9}" for x in t) + "  "
            + " ".join(f"{'1:1 ' + x:>8}" for x in t) + "  " + " ".join(f"{'corr ' + x:>9}" for x in t))
    rows = [head]
    for n, r in per_layer.items():
        for label, rep in (("B", r), ("control", (control or {}).get(n))):
            if rep is None:
                continue
            dec, act = rep["decoder"], rep.get("activations")
            corr = " ".join(f"{act['max_corr'][x]:9.3f}" for x in t) if act else " ".join(f"{'-':>9}" for _ in t)
            rows.append(f"{n:>5} {label:>7} " + " ".join(f"{dec['max_cos_a_to_b'][x]:9.3f}" for x in t) + "  "
                        + " ".join(f"{dec['one_to_one'][x]:8.3f}" for x in t) + "  " + corr)
    return "\n".join(rows)
