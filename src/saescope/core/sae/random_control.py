"""Random-direction control SAEs: the baseline every SAE result should beat (Korznikov 2026 found
random directions matching trained SAEs on probing and editing).

A control has the trained SAE's shape, k and decoder bias: unit decoder rows in random directions
(isotropic, or drawn inside a principal subspace of the data), a tied encoder (W_enc = W_dec) and
b_enc = -W_enc @ b_dec, so each latent reads the projection of the centred activation on its
direction. Projections on random directions are positive for about half the latents of every
token, so top-k keeps k firing latents: the control's L0 equals k, as a trained top-k SAE's does.

A control is of the SAE's own kind (`control random --like` a BatchTopK run gives a BatchTopK control); a kind with
a threshold gets none (NaN: random directions have no learned threshold), so it keeps each token's k largest: the
trained SAE's mean L0. A control of a kind read from files only (relu, gated) is a top-k control at the same k.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from saescope.core.errors import SaescopeError
from saescope.core.sae.base import SAE, SAEConfig


def _control_seed(seed: int) -> int:
    """Control directions get their own random stream. Seeded like a trainer's initialisation (small
    integers), a control would reproduce the initial decoder of a barely trained SAE and "match" it
    perfectly. torch's CPU generator keeps 32 bits of a seed, so the stream is a 32-bit hash."""
    return int.from_bytes(hashlib.sha256(f"saescope-control-{seed}".encode()).digest()[:4], "little")


def principal_basis(x: Tensor, variance: float = 0.9) -> Tensor:
    """(r, d) orthonormal rows spanning the fewest principal components of x (tokens, d) that explain
    `variance` of its variance."""
    if not 0 < variance <= 1:
        raise SaescopeError(f"variance must be in (0, 1], got {variance}")
    if x.shape[0] < 2:
        raise SaescopeError("need at least 2 activation vectors for a principal subspace")
    centred = (x - x.mean(0)).double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    explained = (s**2).cumsum(0) / (s**2).sum()
    r = int((explained < variance - 1e-12).sum()) + 1
    return vh[: min(r, vh.shape[0])].float()


@torch.no_grad()
def random_like(sae: SAE, *, seed: int = 0, basis: Tensor | None = None) -> SAE:
    """A control SAE shaped like `sae`: random unit directions, isotropic or inside span(basis)."""
    d_sae, d_model = sae.cfg.d_sae, sae.cfg.d_model
    gen = torch.Generator().manual_seed(_control_seed(seed))
    if basis is None:
        w = torch.randn(d_sae, d_model, generator=gen)
    else:
        if basis.ndim != 2 or basis.shape[1] != d_model:
            raise SaescopeError(f"basis must have shape (r, {d_model}), got {tuple(basis.shape)}")
        w = torch.randn(d_sae, basis.shape[0], generator=gen) @ basis.float().cpu()
    w = w / w.norm(dim=1, keepdim=True)
    from saescope.core.sae import TRAINABLE_KINDS, make_sae

    kind = sae.cfg.kind if sae.cfg.kind in TRAINABLE_KINDS else "topk"
    control = make_sae(SAEConfig(d_model=d_model, d_sae=d_sae, k=sae.cfg.k, kind=kind))
    if kind == "jumprelu":
        control.log_threshold.fill_(float("nan"))
    b_dec = sae.b_dec.detach().float().cpu()
    control.W_dec.copy_(w)
    control.W_enc.copy_(w)
    control.b_dec.copy_(b_dec)
    control.b_enc.copy_(-(w @ b_dec))
    control.meta = {k: v for k, v in sae.meta.items() if k in ("model", "layer", "hook")}
    control.meta["control"] = {"kind": "random" if basis is None else "random-subspace", "seed": seed,
                               "subspace_dim": None if basis is None else int(basis.shape[0])}
    return control.to(sae.W_dec.device)


def is_control(sae: SAE) -> bool:
    return "control" in sae.meta
