"""Top-k sparse autoencoder (Gao et al. 2024), as Qwen-Scope uses it.

Conventions (those of the released Qwen-Scope checkpoints, so a loaded file needs no folding):
    encode:  z = TopK_k(ReLU(x @ W_enc.T + b_enc))          W_enc: (d_sae, d_model)
    decode:  x_hat = sum_i z_i * W_dec[i] + b_dec            W_dec: (d_sae, d_model), one row per latent
No b_dec is subtracted before encoding; formats that do (sparsify, SAELens) are folded into b_enc on import.

Only the k kept latents of a token ever enter the decoder (embedding_bag over their rows), and both
backwards touch only the selected latents (`_TopKEncode.backward`, `_SparseDecode.backward`), so
nothing of size tokens x d_sae is built except the pre-activations that top-k itself needs (kept in
a reusable `Workspace` when training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saescope.errors import SaescopeError
from saescope.sae.cpu_kernels import fused_top_k_applies, fused_top_k_available, normalize_rows_, project_out_row_norm_, topk_with_bias


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


class LatentGroups:
    """The (token, slot) pairs of a sparse code grouped by latent: argsort of the latent indices plus
    offsets, so that sums over "every token where latent j was selected" are one embedding_bag with
    d_sae bags. Several times faster than a dense scatter + matmul or index_add on CPU, never builds
    tokens x d_sae, and free of atomics (a resumed CUDA run repeats the same sums)."""

    def __init__(self, indices: Tensor, d_sae: int):
        n_tokens, k = indices.shape
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat)
        self.token_of_pair = torch.div(self.order, k, rounding_mode="floor")
        # index_add of integer ones, not bincount: bincount syncs with the host on CUDA to size its output.
        counts = torch.zeros(d_sae, dtype=torch.long, device=indices.device).index_add_(0, flat, torch.ones_like(flat))
        self.offsets = torch.zeros(d_sae + 1, dtype=torch.long, device=indices.device)
        torch.cumsum(counts, 0, out=self.offsets[1:])

    def weighted_sum(self, weights: Tensor, rows: Tensor) -> Tensor:
        """out[j] = sum over (n, s) with indices[n, s] == j of weights[n, s] * rows[n]; (d_sae, d_model)."""
        return F.embedding_bag(self.token_of_pair, rows, self.offsets, mode="sum",
                               per_sample_weights=weights.reshape(-1)[self.order].to(rows.dtype), include_last_offset=True)

    def sum(self, weights: Tensor) -> Tensor:
        """out[j] = sum over (n, s) with indices[n, s] == j of weights[n, s]; (d_sae,)."""
        return torch.segment_reduce(weights.reshape(-1)[self.order], "sum", offsets=self.offsets)


def latent_weighted_sum(indices: Tensor, weights: Tensor, rows: Tensor, d_sae: int) -> Tensor:
    """The gradient of a (d_sae, d_model) weight touched only at the selected latents (see LatentGroups)."""
    return LatentGroups(indices, d_sae).weighted_sum(weights, rows)


def top_k(x: Tensor, k: int, *, bias: Tensor | None = None, block: int = 8) -> tuple[Tensor, Tensor]:
    """The k largest values of each row of x (n, d) (+ bias (d,) when given; a bias of -inf excludes its
    column) and their columns, in no particular order.

    On a CPU with saescope's kernels built (`cpu_kernels`), one pass adds the bias and selects, so the
    encoder can write a bare matmul and AuxK can pass a bias of -inf on live latents instead of
    rewriting the matrix: 1,024 x 9,216 at k 50 in ~5 ms against ~10 ms below plus a 2.5 ms bias pass.
    Otherwise:

    On CPU, torch.topk scans every element through a comparator (2.3 ns each on 2 cores: 15.5 ms for
    1,024 x 9,216, a third of the encoder matmul). Splitting a row into d/block strided groups, the
    k largest elements all lie in the k groups with the largest maxima (any element outside them has
    k group maxima at least as large above it), so: take the group maxima (one vectorised pass),
    find their top k (recursively), and run torch.topk on the k x block candidates only. Exact, same
    values as torch.topk (indices may differ between equal values); 1.7-2.3x faster for widths 4x-64x
    at k 50 (bench/micro.py). On GPU torch.topk is already fast and is used as is.
    """
    if x.dim() != 2:
        values, cols = top_k(x.reshape(-1, x.shape[-1]), k, bias=bias, block=block)
        return values.reshape(*x.shape[:-1], k), cols.reshape(*x.shape[:-1], k)
    if fused_top_k_applies(x, bias):
        return topk_with_bias(x, bias if bias is not None else x.new_zeros(x.shape[1]), k)
    if bias is not None:  # a bias of -inf excludes its column, whatever x holds there (AuxK's mask)
        x = (x + bias).masked_fill_(torch.isneginf(bias), float("-inf"))
    n, d = x.shape
    groups = d // block
    # with fewer than 2k groups the candidates are half the row or more: no gain (AuxK at 4x width)
    if x.device.type != "cpu" or d % block or groups < 2 * k:
        return x.topk(k, dim=-1, sorted=False)
    _, top_groups = top_k(x.reshape(n, block, groups).amax(1), k, block=block)
    offsets = torch.arange(0, d, groups, device=x.device)
    candidates = (top_groups[:, None, :] + offsets[None, :, None]).reshape(n, block * k)
    values, pick = x.gather(1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(1, pick)


class Workspace:
    """Memory reused across training steps and layers for the (tokens x d_sae) pre-activations.

    On CPU a fresh tensor of that size (38 MB for 1,024 tokens x 9,216 latents) comes from mmap and is
    returned to the OS when freed (glibc serves blocks over 32 MB that way), so every layer of every
    step page-faults it in again: 11 ms of a 62 ms encoder matmul on 2 cores, 28 of 185 ms at 4,096
    tokens (bench/micro.py). One buffer, shared by the layers that a trainer steps one after the other,
    removes that cost. Not for concurrent use (a server encoding in several threads uses none).
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def pre_activations(self, n_tokens: int, d_sae: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        need = n_tokens * d_sae
        buf = self._buffer
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != device:
            buf = self._buffer = torch.empty(need, dtype=dtype, device=device)
        return buf[:need].view(n_tokens, d_sae)


class _TopKEncode(torch.autograd.Function):
    """ReLU + top-k with a backward that only touches the selected latents.

    Also returns the AuxK selection: the top k_aux pre-activations among `dead` latents, from the
    same pre-activation matrix (one encoder matmul for both).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, compute_dtype, dead, k_aux, workspace, shared):  # type: ignore[override]
        xc, Wc, bc = x.to(compute_dtype), W_enc.to(compute_dtype), b_enc.to(compute_dtype)
        # With the fused CPU top-k the bias is added while selecting (one pass less over tokens x d_sae).
        fused = fused_top_k_available(x.device, compute_dtype)
        if workspace is None:
            pre = xc @ Wc.T if fused else F.linear(xc, Wc, bc)
        else:
            out = workspace.pre_activations(x.shape[0], W_enc.shape[0], compute_dtype, x.device)
            pre = torch.mm(xc, Wc.T, out=out) if fused else torch.addmm(bc, xc, Wc.T, out=out)
        # top-k before ReLU selects the same latents as ReLU then top-k; ReLU on k values is cheaper.
        values, indices = top_k(pre, k, bias=bc if fused else None)
        values = values.to(W_enc.dtype).clamp_min_(0)
        if dead is not None and k_aux > 0:
            if fused:
                aux_values, aux_indices = top_k(pre, k_aux, bias=bc.masked_fill(~dead, float("-inf")))
            else:
                aux_values, aux_indices = top_k(pre.masked_fill_(~dead, float("-inf")), k_aux)
            aux_values = aux_values.to(W_enc.dtype).clamp_min_(0)
        else:
            aux_values = values.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(x, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        # The grouping of the selected latents serves both weight gradients: built once, here, when the
        # caller will differentiate (it passes `shared`), and handed to the decoder (an argsort of tokens x k).
        # needs_input_grad cannot tell: it is True under no_grad too, and forward itself runs without grad.
        ctx.groups = LatentGroups(indices, W_enc.shape[0]) if shared is not None and indices.dim() == 2 else None
        if shared is not None:
            shared["groups"] = ctx.groups
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):  # type: ignore[override]
        x, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        idx = torch.cat([indices, aux_indices], dim=1)
        grad = torch.cat([grad_values * (values > 0), grad_aux * (aux_values > 0)], dim=1).to(W_enc.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc, mode="sum", per_sample_weights=grad).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            groups = ctx.groups if aux_indices.shape[1] == 0 and ctx.groups is not None else LatentGroups(idx, W_enc.shape[0])
            grad_W = groups.weighted_sum(grad, x.to(W_enc.dtype))
            grad_b = groups.sum(grad)
        return grad_x, grad_W, grad_b, None, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_s values[n, s] * W_dec[indices[n, s]], with the decoder gradient as one grouped sum.

    torch's own embedding_bag backward builds the (d_sae, d_model) gradient by a dense, index_add-like
    pass; grouping by latent (LatentGroups) does the same sums faster on CPU: forward + backward
    19 -> 15 ms for 1,024 tokens x k 50 x 9,216 latents, bit-identical gradients (bench/micro.py).
    The gradient of the values is torch's own kernel.
    """

    @staticmethod
    def forward(ctx, indices, values, W_dec, groups):  # type: ignore[override]
        ctx.save_for_backward(indices, values, W_dec)
        ctx.groups = groups
        return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        indices, values, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:
            n, k = indices.shape
            pairs = torch.arange(n * k, device=indices.device)
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, W_dec, indices.reshape(-1), pairs[::k], torch.div(pairs, k, rounding_mode="floor"), 0
            ).view(n, k)
        if ctx.needs_input_grad[2]:
            groups = ctx.groups or LatentGroups(indices, W_dec.shape[0])
            grad_W = groups.weighted_sum(values, grad_out)
        return None, grad_values, grad_W, None


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, groups: LatentGroups | None = None) -> Tensor:
    """(n, k) latents and their values -> (n, d_model), without the bias; `groups` of these indices, when
    already built, save the backward an argsort."""
    values = values.to(W_dec.dtype)
    if W_dec.device.type != "cpu" or indices.shape[-1] == 0:  # the grouped backward is measured faster on CPU only; GPUs keep torch's
        return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values)
    return _SparseDecode.apply(indices, values, W_dec, groups)


@dataclass
class ForwardOutput:
    x_hat: Tensor
    code: SparseCode
    fvu: Tensor  # fraction of variance unexplained, the main loss
    auxk_fvu: Tensor  # AuxK loss (0 when no latent is dead)


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

    # ---- the maths ----
    def encode(self, x: Tensor) -> SparseCode:
        values, indices, _, _ = _TopKEncode.apply(x, self.W_enc, self.b_enc, self.cfg.k, self.compute_dtype, None, 0, None, None)
        return SparseCode(indices, values)

    def pre_activations(self, x: Tensor, latents: Tensor | None = None) -> Tensor:
        """Dense pre-activations x @ W_enc.T + b_enc of chosen latents, differentiable in x and W_enc."""
        if latents is None:
            return F.linear(x, self.W_enc.to(x.dtype), self.b_enc.to(x.dtype))
        return F.linear(x, self.W_enc[latents].to(x.dtype), self.b_enc[latents].to(x.dtype))

    def decode(self, code: SparseCode) -> Tensor:
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
        `workspace` holds the pre-activations between steps (see `Workspace`).
        """
        x = x.to(self.W_enc.dtype)
        if dead is not None and n_dead is None:
            n_dead = int(dead.sum())
        k_aux = min(self.cfg.d_model // 2, n_dead or 0)
        shared: dict | None = {} if torch.is_grad_enabled() and self.W_enc.requires_grad else None
        values, indices, aux_values, aux_indices = _TopKEncode.apply(
            x, self.W_enc, self.b_enc, self.cfg.k, self.compute_dtype, dead if k_aux > 0 else None, k_aux, workspace, shared
        )
        code = SparseCode(indices, values, shared["groups"] if shared else None)
        x_hat = self.decode(code)
        w = weights.to(x.dtype)[:, None] if weights is not None else None
        if variance is None:
            variance = _centred_sum_sq(x, w)
        error = x - x_hat
        fvu = (error.pow(2) if w is None else error.pow(2) * w).sum() / variance
        if k_aux > 0:
            # The dead latents learn to predict the live latents' residual (Gao et al. section A.2).
            residual = error.detach()
            aux_hat = sparse_decode(aux_indices, aux_values, self.W_dec)
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
