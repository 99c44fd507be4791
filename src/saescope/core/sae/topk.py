"""Top-k sparse autoencoder: Gao et al. (2024), "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093).

    encode:  z = TopK_k(ReLU(W_enc x + b_enc))                      W_enc: (d_sae, d_model)
    decode:  x_hat = sum_i z_i W_dec[i] + b_dec                      W_dec: (d_sae, d_model), one row per latent
    loss:    FVU = sum |x - x_hat|^2 / sum |x - mean(x)|^2           (the MSE normalised by the data's variance)
    AuxK:    e = x - x_hat (a constant), z_aux = TopK_{k_aux} of the pre-activations of the dead latents only,
             auxk = min(n_dead / k_aux, 1) sum |W_dec z_aux - e|^2 / sum |e - mean(e)|^2, k_aux = min(d_model / 2, n_dead)
    init:    W_dec rows random unit vectors, W_enc = W_dec (tied), b_dec = data mean, b_enc = -W_enc b_dec
    constraint: unit-norm decoder rows: the gradient along each row is projected out before the optimiser
             step, and the rows are renormalised after it.
These are the conventions of the released Qwen-Scope checkpoints, so a loaded file needs no folding: no b_dec
is subtracted before encoding (formats that do, sparsify and SAELens, are folded into b_enc on import).

`reference_encode` and `reference_decode` below are this maths written plainly with torch ops. TopKSAE runs
the same maths through the fast path of `saescope.core.sae.fast` (sparse backwards, blockwise or fused-kernel top-k,
a reused pre-activation buffer); `TopKSAE.fused = False` switches to the reference, and tests/sae/test_fast.py
checks that both give the same codes, losses and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saescope.core.errors import SaescopeError
from saescope.core.sae.cpu_kernels import normalize_rows_, project_out_row_norm_
from saescope.core.sae.fast import LatentGroups, Workspace, fused_topk_encode, sparse_decode


@dataclass(frozen=True)
class SAEConfig:
    d_model: int
    d_sae: int
    k: int

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.d_sae <= 0:
            raise SaescopeError(f"d_model and d_sae must be positive, got {self.d_model} and {self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise SaescopeError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")


@dataclass
class SparseCode:
    """Per-token sparse code: the k kept latents of each token (values are >= 0; 0 means 'not firing')."""

    indices: Tensor  # (..., k) int64
    values: Tensor  # (..., k)
    groups: LatentGroups | None = None  # of a training forward: shared by the encoder's and decoder's backward

    def dense(self, d_sae: int) -> Tensor:
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter_(-1, self.indices, self.values)


@dataclass
class ForwardOutput:
    x_hat: Tensor
    code: SparseCode
    fvu: Tensor  # fraction of variance unexplained, the main loss
    auxk_fvu: Tensor  # AuxK loss (0 when no latent is dead)


# ---- the maths, plainly: the reference that saescope.core.sae.fast is tested against ----
def reference_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, compute_dtype: torch.dtype | None = None,
                     dead: Tensor | None = None, k_aux: int = 0) -> tuple[SparseCode, SparseCode | None]:
    """z = TopK_k(ReLU(W_enc x + b_enc)) of each token; with `dead` (d_sae,) bool and k_aux > 0 also the AuxK
    code, the top k_aux among the dead latents only (else None). The matmul and top-k run in compute_dtype
    (W_enc's by default), the values come back in W_enc's dtype."""
    cd = compute_dtype or W_enc.dtype
    pre = F.linear(x.to(cd), W_enc.to(cd), b_enc.to(cd))  # W_enc x + b_enc: (..., d_sae)
    code = _top_k_relu(pre, k, W_enc.dtype)
    if dead is None or k_aux == 0:
        return code, None
    return code, _top_k_relu(pre.masked_fill(~dead, float("-inf")), k_aux, W_enc.dtype)


def _top_k_relu(pre: Tensor, k: int, dtype: torch.dtype) -> SparseCode:
    # ReLU after top-k gives the same z as ReLU before it (it only changes which of several zeros are kept)
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseCode(indices, values.to(dtype).relu())


def reference_decode(code: SparseCode, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """x_hat = z @ W_dec (+ b_dec) = sum_i z_i W_dec[i] (+ b_dec), z the dense (..., d_sae) code."""
    out = code.dense(W_dec.shape[0]).to(W_dec.dtype) @ W_dec
    return out if b_dec is None else out + b_dec


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_model, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_model, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model, dtype=dtype, device=device))
        # The dtype of the encoder matmul and top-k; bf16 halves their cost, master weights stay fp32.
        self.compute_dtype = dtype
        # Where the SAE belongs (model, layer, origin format): carried along, never used by the maths.
        self.meta: dict = {}
        # Encode and decode through saescope.core.sae.fast; False runs reference_encode / reference_decode instead.
        self.fused = True

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int:
        return self.cfg.k

    # ---- initialisation (Gao et al.): tied, unit-norm decoder rows, b_dec from the data ----
    @torch.no_grad()
    def init_tied(self, generator: torch.Generator | None = None) -> None:
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32).to(self.W_dec)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()

    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> None:
        """Set b_dec to the data mean, and b_enc so that encoding is centred on it at step 0."""
        mean = x.float().mean(0).to(self.b_dec)
        self.b_dec.copy_(mean)
        self.b_enc.copy_(-(self.W_enc @ mean))

    # ---- the maths (each step: the fast path, or the reference above when self.fused is False) ----
    def encode(self, x: Tensor) -> SparseCode:
        """z = TopK_k(ReLU(W_enc x + b_enc)) of each token (..., d_model): its k kept latents and their values."""
        if not self.fused:
            return reference_encode(x, self.W_enc, self.b_enc, self.cfg.k, compute_dtype=self.compute_dtype)[0]
        fast = fused_topk_encode(x, self.W_enc, self.b_enc, k=self.cfg.k, compute_dtype=self.compute_dtype)
        return SparseCode(fast.indices, fast.values)

    def _encode_with_aux(self, x: Tensor, dead: Tensor | None, k_aux: int,
                         workspace: Workspace | None) -> tuple[SparseCode, SparseCode | None]:
        """The code of x (tokens, d_model) and, when k_aux > 0, the AuxK code among the `dead` latents."""
        if not self.fused:
            return reference_encode(x, self.W_enc, self.b_enc, self.cfg.k, compute_dtype=self.compute_dtype,
                                    dead=dead, k_aux=k_aux)
        fast = fused_topk_encode(x, self.W_enc, self.b_enc, k=self.cfg.k, compute_dtype=self.compute_dtype,
                                 dead=dead, k_aux=k_aux, workspace=workspace,
                                 with_groups=torch.is_grad_enabled() and self.W_enc.requires_grad)
        aux = SparseCode(fast.aux_indices, fast.aux_values) if k_aux > 0 else None
        return SparseCode(fast.indices, fast.values, fast.groups), aux

    def pre_activations(self, x: Tensor, latents: Tensor | None = None) -> Tensor:
        """Dense pre-activations x @ W_enc.T + b_enc of chosen latents, differentiable in x and W_enc."""
        if latents is None:
            return F.linear(x, self.W_enc.to(x.dtype), self.b_enc.to(x.dtype))
        return F.linear(x, self.W_enc[latents].to(x.dtype), self.b_enc[latents].to(x.dtype))

    def decode(self, code: SparseCode) -> Tensor:
        """x_hat = sum_i z_i W_dec[i] + b_dec."""
        if not self.fused:
            return reference_decode(code, self.W_dec, self.b_dec)
        lead = code.indices.shape[:-1]
        idx = code.indices.reshape(-1, code.indices.shape[-1])
        val = code.values.reshape(-1, code.values.shape[-1])
        groups = code.groups if code.indices.dim() == 2 else None
        out = sparse_decode(idx, val, self.W_dec, groups) + self.b_dec
        return out.reshape(*lead, self.cfg.d_model)

    def reconstruct(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return self.decode(self.encode(flat)).reshape(shape).to(x.dtype)

    def forward(self, x: Tensor, dead: Tensor | None = None, *, n_dead: int | None = None,
                weights: Tensor | None = None, variance: Tensor | None = None,
                workspace: Workspace | None = None) -> ForwardOutput:
        """Training forward on (tokens, d_model): reconstruction, FVU and the AuxK loss on `dead` latents.

        `weights` (tokens,) of 0/1 leave tokens out of every loss without changing shapes (the outlier
        filter uses it, so no host sync is needed to know how many tokens remain). `variance` is FVU's
        denominator, sum w |x - mean(x)|^2; pass it when x is one shard of a larger batch so that the
        shards' losses add up to the whole batch's. `n_dead` saves a sync when the caller knows it.
        `workspace` holds the pre-activations between steps (see `fast.Workspace`; the reference ignores it).
        """
        x = x.to(self.W_enc.dtype)
        if dead is not None and n_dead is None:
            n_dead = int(dead.sum())
        k_aux = min(self.cfg.d_model // 2, n_dead or 0)
        code, aux = self._encode_with_aux(x, dead, k_aux, workspace)
        x_hat = self.decode(code)
        w = weights.to(x.dtype)[:, None] if weights is not None else None
        if variance is None:
            variance = _centred_sum_sq(x, w)
        error = x - x_hat
        fvu = (error.pow(2) if w is None else error.pow(2) * w).sum() / variance
        if k_aux > 0:
            # The dead latents learn to predict the live latents' residual (Gao et al. section A.2).
            residual = error.detach()
            aux_hat = sparse_decode(aux.indices, aux.values, self.W_dec) if self.fused else reference_decode(aux, self.W_dec)
            scale = min(n_dead / k_aux, 1.0)
            aux_err = (aux_hat - residual).pow(2)
            auxk = scale * (aux_err if w is None else aux_err * w).sum() / _centred_sum_sq(residual, w)
            auxk = torch.nan_to_num(auxk, nan=0.0)
        else:
            auxk = fvu.new_zeros(())
        return ForwardOutput(x_hat, code, fvu, auxk)

    # ---- the decoder-norm constraint ----
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each decoder row's gradient the part that would change its norm."""
        if self.W_dec.grad is not None:
            project_out_row_norm_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        normalize_rows_(self.W_dec)


def _centred_sum_sq(x: Tensor, w: Tensor | None) -> Tensor:
    if w is None:
        return (x - x.mean(0)).pow(2).sum()
    mean = (x * w).sum(0) / w.sum().clamp_min(1)
    return ((x - mean).pow(2) * w).sum().clamp_min(torch.finfo(x.dtype).tiny)


def default_lr(d_sae: int) -> float:
    """Gao et al.'s scaling of the Adam learning rate with the dictionary width."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
