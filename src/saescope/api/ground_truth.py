"""How many of the true features of synthetic activations (saescope.core.data.synthetic) an SAE recovers:

    recovered       share of true features with a decoder row at cosine > 0.9 (the best row of each)
    mean_best_cos   the mean over true features of that best cosine
    mcc             the mean correlation coefficient: latents and true features matched one to one (greedily, by the
                    Pearson correlation of their activations on held-out samples), the matched correlations averaged
                    over the true features (0 for a feature left without a latent)
    absorption      over the (parent, child) pairs: of the samples where both fire, the share where the latent of the
                    child fires and the latent of the parent does not (the child's latent absorbed the parent's)
    explained_variance   1 - FVU on the held-out samples
    l0              mean latents firing per held-out sample
    recovered_by_frequency   recovered in quartiles of the features' firing probability
    recovered_by_structure   recovered among the features in no pair, in correlated pairs, the parents and the
                    children: a child fires only with its parent, so an SAE that learns "parent alone" and "parent with
                    child" latents (absorption) recovers neither direction at cosine > 0.9; the ceiling such pairs put
                    on `recovered` is their share of the features

Korznikov et al. 2026 report these beside frozen-decoder controls; a random control should recover none.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from saescope.core.data.synthetic import SyntheticFeatures
from saescope.core.sae import SAE

RECOVERED_COS = 0.9


@torch.no_grad()
def _codes(sae: SAE, x: Tensor, chunk: int = 8192) -> Tensor:
    """(n, d_sae) dense latent activations."""
    out = []
    for start in range(0, len(x), chunk):
        out.append(sae.encode(x[start:start + chunk].to(sae.W_enc.device)).dense(sae.cfg.d_sae).float().cpu())
    return torch.cat(out)


def _standardise(a: Tensor) -> Tensor:
    a = a.double() - a.double().mean(0)
    return a / a.norm(dim=0).clamp_min(1e-12)


def greedy_matching(corr: np.ndarray) -> np.ndarray:
    """For each column (true feature), the correlation of the row (latent) matched to it one to one, greedily from the
    largest correlation down (0 where none is left): an approximation of the Hungarian matching that never pairs one
    latent with two features."""
    rows, cols = corr.shape
    order = np.argsort(-corr, axis=None)
    row_used, col_value = np.zeros(rows, bool), np.full(cols, np.nan)
    left = min(rows, cols)
    for flat in order:
        r, c = divmod(int(flat), cols)
        if row_used[r] or not np.isnan(col_value[c]):
            continue
        row_used[r], col_value[c] = True, corr[r, c]
        left -= 1
        if left == 0:
            break
    return np.nan_to_num(col_value, nan=0.0)


@torch.no_grad()
def ground_truth_scores(sae: SAE, features: SyntheticFeatures, x: Tensor, truth: Tensor) -> dict:
    """The module doc's figures for one SAE on held-out samples x (n, d) with their true activations truth (n, N)."""
    W = sae.W_dec.detach().double().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = features.directions @ W.T  # (N, d_sae)
    best_cos, best_latent = cos.max(1)
    z = _codes(sae, x)
    x_hat = []
    for start in range(0, len(x), 8192):
        x_hat.append(sae.reconstruct(x[start:start + 8192].to(sae.W_enc.device)).float().cpu())
    x_hat = torch.cat(x_hat)
    ev = 1 - float((x - x_hat).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum())
    corr = (_standardise(z).T @ _standardise(truth)).numpy()  # (d_sae, N) Pearson correlations
    matched = greedy_matching(corr)
    fires_z, fires_t = z > 0, truth > 0
    rates = []
    for parent, child in zip(features.parents.tolist(), features.children.tolist()):
        both = fires_t[:, parent] & fires_t[:, child]
        if int(both.sum()) == 0:
            continue
        lp, lc = int(best_latent[parent]), int(best_latent[child])
        if lp == lc:  # one latent for both: merged, not absorbed
            rates.append(0.0)
            continue
        absorbed = both & ~fires_z[:, lp] & fires_z[:, lc]
        rates.append(float(absorbed.sum()) / float(both.sum()))
    return {"recovered": float((best_cos > RECOVERED_COS).double().mean()), "mean_best_cos": float(best_cos.mean()),
            "mcc": float(matched.mean()), "absorption": float(np.mean(rates)) if rates else float("nan"),
            "explained_variance": ev, "l0": float(fires_z.sum(1).double().mean()),
            "recovered_by_frequency": _by_frequency(best_cos, features),
            "recovered_by_structure": _by_structure(best_cos, features)}


def _by_structure(best_cos: Tensor, features: SyntheticFeatures) -> dict:
    """Recovery of the features in no pair, in correlated pairs, the parents and the children, with their counts."""
    groups = {"correlated": features.correlated.flatten(), "parents": features.parents, "children": features.children}
    unpaired = torch.ones(len(best_cos), dtype=torch.bool)
    for members in groups.values():
        unpaired[members] = False
    groups = {"unpaired": unpaired.nonzero().flatten(), **groups}
    return {name: {"features": len(members),
                   "recovered": float((best_cos[members] > RECOVERED_COS).double().mean()) if len(members) else float("nan")}
            for name, members in groups.items()}


def _by_frequency(best_cos: Tensor, features: SyntheticFeatures) -> list[dict]:
    """Recovery in quartiles of the features' firing probability: rare features are the hard ones."""
    p = features.effective_probability()
    order = p.argsort()
    out = []
    for part in order.chunk(4):
        out.append({"p_min": float(p[part].min()), "p_max": float(p[part].max()),
                    "recovered": float((best_cos[part] > RECOVERED_COS).double().mean())})
    return out
