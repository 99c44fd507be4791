"""The fast path of the top-k SAE: the same maths as `topk.reference_encode` / `reference_decode`, faster.

Only the k kept latents of a token ever enter the decoder (embedding_bag over their rows), and both
backwards touch only the selected latents (`_TopKEncode.backward`, `_SparseDecode.backward`), so
nothing of size tokens x d_sae is built except the pre-activations that top-k itself needs (kept in
a reusable `Workspace` when training). tests/sae/test_fast.py holds this module to the reference.

    fused_topk_encode   matmul + top-k + ReLU (+ the AuxK selection from the same matmul), sparse backward
    sparse_decode       sum_s values[n, s] * W_dec[indices[n, s]], grouped decoder gradient
    top_k               exact top-k: the fused CPU kernel, or blockwise group maxima, or torch.topk
    LatentGroups        (token, slot) pairs grouped by latent: the weight gradients as one embedding_bag
    Workspace           the (tokens x d_sae) pre-activation buffer reused across steps and layers
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saescope.core.sae.cpu_kernels import (
    fused_top_k_applies,
    fused_top_k_available,
    gathered_dots,
    gathers,
    group_by_latent,
    rerank_exact,
    topk_with_bias,
    weighted_bags,
)
from saescope.core.system import BF16_MIN_SPEEDUP, cpu_bf16_speedup


class LatentGroups:
    """The (token, slot) pairs of a sparse code grouped by latent: a stable sort of the latent indices plus
    offsets, so that sums over "every token where latent j was selected" are one embedding_bag with
    d_sae bags. Several times faster than a dense scatter + matmul or index_add on CPU, never builds
    tokens x d_sae, and free of atomics (a resumed CUDA run repeats the same sums)."""

    def __init__(self, indices: Tensor, d_sae: int, tokens: Tensor | None = None):
        """`indices` (tokens, k); or a ragged code's (pairs,) latents with `tokens` (pairs,) saying whose each is."""
        self.order, self.offsets = group_by_latent(indices.reshape(-1), d_sae)
        if tokens is None:
            self.token_of_pair = torch.div(self.order, indices.shape[1], rounding_mode="floor")
        else:
            self.token_of_pair = tokens[self.order]

    def weighted_sum(self, weights: Tensor, rows: Tensor) -> Tensor:
        """out[j] = sum over (n, s) with indices[n, s] == j of weights[n, s] * rows[n]; (d_sae, d_model), float32 on a CPU
        with saescope's kernels (rows read in their dtype: bf16 rows where the step computes in bf16), else rows' dtype."""
        return weighted_bags(rows, self.token_of_pair, weights.reshape(-1)[self.order], self.offsets)

    def sum(self, weights: Tensor) -> Tensor:
        """out[j] = sum over (n, s) with indices[n, s] == j of weights[n, s]; (d_sae,)."""
        return torch.segment_reduce(weights.reshape(-1)[self.order], "sum", offsets=self.offsets)


class Ragged(NamedTuple):
    """The nonzero entries of a padded (tokens, width) code, flattened: what a code whose width is its widest token's
    (a threshold or batch selection: most entries zero) costs to decode and differentiate, without the padding."""

    mask: Tensor  # (tokens, width) bool: the entries kept
    latents: Tensor  # (pairs,)
    tokens: Tensor  # (pairs,) the token of each pair
    offsets: Tensor  # (tokens,) where each token's pairs start

    @staticmethod
    def of(indices: Tensor, keep: Tensor) -> Ragged:
        counts = keep.sum(1)
        offsets = torch.zeros_like(counts)
        torch.cumsum(counts[:-1], 0, out=offsets[1:])
        tokens = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        return Ragged(keep, indices[keep], tokens, offsets)

    def bags(self, weights: Tensor, table: Tensor) -> Tensor:
        """(tokens, d) = per token, sum over its pairs of weights[pair] * table[latent of pair]. torch's embedding_bag, not
        the kernels' gather: a ragged decoder is differentiated through it (the kernels have no backward)."""
        return F.embedding_bag(self.latents, table, self.offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def bf16_gathers(device: torch.device, compute_dtype: torch.dtype | None) -> bool:
    """Whether a step computing in `compute_dtype` runs its backward's gathers on bf16 tables: a bf16 step, on a CPU
    with saescope's kernels."""
    return compute_dtype == torch.bfloat16 and gathers(device)


def token_bags(table: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """(n, d) = per token n, sum over s of weights[n, s] * table[indices[n, s]] (weighted_bags: the kernels' gather on a
    CPU with them, float32 out; torch's embedding_bag elsewhere)."""
    n, k = indices.shape
    offsets = torch.arange(0, n * k + 1, k, device=indices.device)
    return weighted_bags(table, indices.reshape(-1), weights.reshape(-1), offsets)


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


def weight_as(w: Tensor, dtype: torch.dtype, reuse: bool) -> Tensor:
    """w in dtype; with `reuse`, the copy is kept on w and served again until w changes (its version or storage): a
    read loop encoding many small batches (probing, evaluation) otherwise converts the whole matrix per batch, which cost
    quality ten of its seconds. A training step, whose weights change every step, converts afresh and keeps nothing."""
    if w.dtype == dtype:
        return w
    key = (w._version, w.data_ptr(), dtype)
    kept = getattr(w, "_saescope_copy", None)
    if reuse and kept is not None and kept[0] == key:
        return kept[1]
    out = w.detach().to(dtype)
    if reuse:
        w._saescope_copy = (key, out)
    return out


class Workspace:
    """Memory reused across training steps and layers for the (tokens x d_sae) pre-activations.

    On CPU a fresh tensor of that size (38 MB for 1,024 tokens x 9,216 latents) comes from mmap and is
    returned to the OS when freed (glibc serves blocks over 32 MB that way), so every layer of every
    step page-faults it in again: 11 ms of a 62 ms encoder matmul on 2 cores, 28 of 185 ms at 4,096
    tokens (bench/micro.py). One buffer, shared by the layers that a trainer steps one after the other,
    removes that cost. Not for concurrent use (a server encoding in several threads uses none).
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}  # one per dtype (a JumpReLU's threshold code holds another)

    def pre_activations(self, n_tokens: int, d_sae: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        need = n_tokens * d_sae
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < need or buf.device != device:
            buf = self._buffers[dtype] = torch.empty(need, dtype=dtype, device=device)
        return buf[:need].view(n_tokens, d_sae)


# What an encoder's forward hands its backward: values, indices, AuxK values and indices, and the (x, W_enc) tables the
# gradients gather from.
_Encoded = tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]


class Encoding(NamedTuple):
    """What `fused_topk_encode` returns: the top-k code, the AuxK code (empty when k_aux is 0) and, when
    asked for, the grouping of the selected latents for the decoder's backward."""

    values: Tensor  # (..., k), >= 0
    indices: Tensor  # (..., k) int64
    aux_values: Tensor  # (n, k_aux), >= 0
    aux_indices: Tensor  # (n, k_aux) int64
    groups: LatentGroups | None


@dataclass(frozen=True)
class _EncodeOptions:
    k: int
    compute_dtype: torch.dtype
    dead: Tensor | None  # (d_sae,) bool: AuxK selects among these latents
    k_aux: int
    workspace: Workspace | None
    with_groups: bool
    per_batch: bool = False  # BatchTopK: the k x tokens largest of the whole batch, not k per token
    rows: Tensor | None = None  # with per_batch: the tokens that take part (the others fire nothing)
    reuse: bool = False  # no gradient wanted: the weights' low-precision copy is kept for the next call (weight_as)


def fused_topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, *, k: int, compute_dtype: torch.dtype,
                      dead: Tensor | None = None, k_aux: int = 0, workspace: Workspace | None = None,
                      with_groups: bool = False, per_batch: bool = False, rows: Tensor | None = None,
                      centre: Tensor | None = None) -> Encoding:
    """values, indices = TopK_k(ReLU((x - centre) @ W_enc.T + b_enc)), and the top k_aux pre-activations among the
    `dead` latents (AuxK) from the same matmul; differentiable in x, W_enc, b_enc and centre (a centred encoder's
    b_dec: its gradient is -grad(b_enc) @ W_enc, one product, where x - b_dec taken outside would send every token's
    gradient back through a gather of W_enc's rows).

    The matmul and top-k run in `compute_dtype`, the values and gradients in W_enc's dtype. `workspace`
    holds the pre-activations between calls. `with_groups` (a training forward that will be
    differentiated) builds the grouping of the selected latents once, for both weight gradients. `per_batch` selects
    BatchTopK's k x tokens largest ReLU'd pre-activations of the whole batch instead (a token's width is then the
    widest token's, padded with zero values; see batch_top_k), among the tokens `rows` (bool) when given.
    """
    options = _EncodeOptions(k, compute_dtype, dead if k_aux > 0 else None, k_aux, workspace, with_groups, per_batch, rows,
                             reuse=not torch.is_grad_enabled())
    return Encoding(*_TopKEncode.apply(x, W_enc, b_enc, centre, options))


class _TopKEncode(torch.autograd.Function):
    """ReLU + top-k with a backward that only touches the selected latents (see `fused_topk_encode`)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, centre, options):  # type: ignore[override]
        o: _EncodeOptions = options
        ctx.centred = centre is not None
        if ctx.centred:
            x = x - centre.to(x.dtype)
        encode = _screened_encode if screens(x.device, o.compute_dtype) else _plain_encode
        values, indices, aux_values, aux_indices, ctx.tables = encode(x, W_enc, b_enc, o)
        ctx.save_for_backward(x, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        # The grouping serves both weight gradients: built here, once, and returned for the decoder (an
        # argsort of tokens x k). needs_input_grad cannot tell whether it is wanted: it is True under
        # no_grad too, and forward itself runs without grad; hence the caller's `with_groups`.
        ctx.ragged = o.per_batch and indices.dim() == 2
        ctx.groups = LatentGroups(indices, W_enc.shape[0]) if o.with_groups and indices.dim() == 2 and not ctx.ragged else None
        return values, indices, aux_values, aux_indices, ctx.groups

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai, _groups):  # type: ignore[override]
        x, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors  # x: the encoder's input, centred
        idx = torch.cat([indices, aux_indices], dim=1)
        grad = torch.cat([grad_values * (values > 0), grad_aux * (aux_values > 0)], dim=1).to(W_enc.dtype)
        x_table, W_table = ctx.tables  # what the forward's matmul read: bf16 copies where it ran in bf16 on a CPU
        ctx.tables = None
        need_x, need_W, need_b, need_centre = ctx.needs_input_grad[:4]
        grad_x = grad_W = grad_b = None
        if ctx.ragged:  # a batch selection pads every token to the widest: sum over the firing pairs only
            pairs = Ragged.of(idx, grad != 0)
            g = grad[pairs.mask]
            grad_x = pairs.bags(g, W_enc).to(x.dtype) if need_x else None
            groups = LatentGroups(pairs.latents, W_enc.shape[0], tokens=pairs.tokens) if need_W or need_b or need_centre else None
        else:
            if need_x:
                grad_x = token_bags(W_table, idx, grad).to(x.dtype)
            reuse = aux_indices.shape[1] == 0 and ctx.groups is not None
            groups = (ctx.groups if reuse else LatentGroups(idx, W_enc.shape[0])) if need_W or need_b or need_centre else None
            g = grad
        if need_W:
            grad_W = groups.weighted_sum(g, x_table).to(W_enc.dtype)
        if need_b or need_centre:
            grad_b = groups.sum(g)
        grad_centre = -(grad_b.to(W_enc.dtype) @ W_enc) if ctx.centred and need_centre else None
        return grad_x, grad_W, grad_b if need_b else None, grad_centre, None


def _plain_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, o: _EncodeOptions) -> _Encoded:
    """The matmul and top-k in o.compute_dtype; values in W_enc's dtype."""
    xc, Wc, bc = x.to(o.compute_dtype), weight_as(W_enc, o.compute_dtype, o.reuse), b_enc.to(o.compute_dtype)
    # With the fused CPU top-k the bias is added while selecting (one pass less over tokens x d_sae), in float32.
    fused = fused_top_k_available(x.device, o.compute_dtype)
    if fused:
        bc = b_enc.float()
    if o.workspace is None:
        pre = xc @ Wc.T if fused else F.linear(xc, Wc, bc)
    else:
        out = o.workspace.pre_activations(x.shape[0], W_enc.shape[0], o.compute_dtype, x.device)
        pre = torch.mm(xc, Wc.T, out=out) if fused else torch.addmm(bc, xc, Wc.T, out=out)
    if o.per_batch:
        if fused:  # the batch's selection compares every token's values: the bias goes in first
            pre = pre.add_(bc.to(pre.dtype))
        if o.rows is None:
            values, indices = batch_top_k(pre, o.k * pre.shape[0])
        else:
            values, indices = batch_top_k(pre.masked_fill(~o.rows[:, None], float("-inf")), o.k * int(o.rows.sum()))
        values = values.to(W_enc.dtype)
        aux_bias = torch.zeros_like(bc)  # the bias is in pre already
    else:
        # top-k before ReLU selects the same latents as ReLU then top-k; ReLU on k values is cheaper.
        values, indices = top_k(pre, o.k, bias=bc if fused else None)
        values = values.to(W_enc.dtype).clamp_min_(0)
        aux_bias = bc if fused else None
    if o.dead is not None:
        if aux_bias is not None:
            aux_values, aux_indices = top_k(pre, o.k_aux, bias=aux_bias.masked_fill(~o.dead, float("-inf")))
        else:
            aux_values, aux_indices = top_k(pre.masked_fill_(~o.dead, float("-inf")), o.k_aux)
        aux_values = aux_values.to(W_enc.dtype).clamp_min_(0)
    else:
        aux_values = values.new_zeros(x.shape[0], 0)
        aux_indices = indices.new_zeros(x.shape[0], 0)
    # A bf16 step's backward gathers from the bf16 tables this matmul read (half the bytes) where saescope's kernels run
    # them; elsewhere, and at any other dtype, from the weights' own.
    tables = (xc, Wc) if bf16_gathers(x.device, o.compute_dtype) else (x.to(W_enc.dtype), W_enc)
    return values, indices, aux_values, aux_indices, tables


SCREEN_MARGIN = 0.5  # the bf16 screen shortlists k * (1 + margin) latents per token for the fp32 ranking
_SCREEN_PAYS: dict[str, bool] = {}


def screens(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether an fp32 encoder on this device runs as a bf16 screen + fp32 ranking (`_screened_encode`): on a
    CPU with saescope's AVX-512 kernels whose bf16 matmuls are measured much faster than fp32 (the same
    measurement that puts the LM in bf16 there: saescope.core.system.cpu_bf16_speedup; SAESCOPE_CPU_DTYPE=fp32 turns
    both off). An explicitly bf16 encoder, and every GPU, keep the plain path. The choice changes no figure beyond
    ties (see `_screened_encode`), so ranks or a resumed run that decide differently still train the same."""
    if device.type != "cpu" or compute_dtype != torch.float32:
        return False
    forced = os.environ.get("SAESCOPE_CPU_DTYPE", "").lower()
    if forced not in _SCREEN_PAYS:  # a forced bf16 is not a measurement: a CPU without native bf16 would emulate it
        _SCREEN_PAYS[forced] = (forced not in ("fp32", "float32") and fused_top_k_available(device, torch.float32)
                                and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP)
    return _SCREEN_PAYS[forced]


def batch_top_k(pre: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """BatchTopK's selection (Bussmann et al. 2024): the `total` largest positive entries of pre (tokens, d) over the
    whole batch, as each token's (values, columns), padded with zero values to the widest token's count. Exact: each
    token's m largest are the candidates (m = 4 x total / tokens at first); while some token's every candidate is in
    the batch's selection (it might have more), m grows fourfold, up to d."""
    n, d = pre.shape
    m = min(d, 4 * max(1, -(-total // max(n, 1))))
    while True:
        cand_vals, cand_idx = top_k(pre, m)
        picked = select_from_candidates(cand_vals, cand_idx, total, complete=m == d)
        if picked is not None:
            return picked
        m = min(d, 4 * m)


def select_from_candidates(cand_vals: Tensor, cand_idx: Tensor, total: int, *,
                           complete: bool) -> tuple[Tensor, Tensor] | None:
    """The batch's `total` largest positive entries among each token's candidates (its largest entries: values and
    columns, (tokens, m)), padded with zero values to the widest token; None when a token's every candidate was
    selected and the candidates are not `complete` (its next entries might belong to the selection too)."""
    n = cand_vals.shape[0]
    if total <= 0 or n == 0:
        return cand_vals.new_zeros(n, 1), torch.zeros(n, 1, dtype=torch.long, device=cand_vals.device)
    flat = cand_vals.reshape(-1)
    threshold = flat.kthvalue(flat.numel() - min(total, flat.numel()) + 1).values
    if not complete and bool((cand_vals.min(1).values >= threshold).any()):
        return None
    keep = (cand_vals >= threshold) & (cand_vals > 0)
    width = max(1, int(keep.sum(1).max()))
    vals, pick = cand_vals.masked_fill(~keep, float("-inf")).topk(width, dim=1, sorted=False)
    return vals.clamp_min(0), cand_idx.gather(1, pick)  # -inf (not kept) becomes a zero value


def threshold_code(pre: Tensor, threshold: Tensor | float) -> tuple[Tensor, Tensor]:
    """The latents of each row of pre (tokens, d) whose pre-activation exceeds the threshold (a number, or one per
    latent), as (values, columns) padded with zero values to the widest row's count."""
    over = pre - threshold if isinstance(threshold, float) or threshold.dim() == 0 else pre - threshold[None, :]
    width = max(1, int((over > 0).sum(1).max()))
    margin, cols = top_k(over.contiguous(), width)
    vals = pre.gather(1, cols)
    return torch.where(margin > 0, vals, torch.zeros_like(vals)).clamp_min(0), cols


def shortlist_rerank(approx: Tensor, x: Tensor, W: Tensor, bias: Tensor, k: int, m: int) -> tuple[Tensor, Tensor]:
    """The screen's two halves: the m largest of `approx` + bias (a bf16 product's scores, fp32, (n, d)) shortlist
    each row's candidates; the k largest exact x[r] . W[c] + bias[c] among them are kept. (values, columns), fp32."""
    _, shortlist = top_k(approx, min(W.shape[0], m), bias=bias)
    return rerank_exact(x, W, bias, shortlist, k)


def _screened_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, o: _EncodeOptions) -> _Encoded:
    """The fp32 encoder, computed faster: the bf16 matmul (5-7x faster than fp32 on CPUs with AMX) shortlists
    each token's 1.5k largest latents; their pre-activations are recomputed in fp32 and the k largest kept.
    Values are fp32 dot products, and a latent differs from the fp32 matmul's choice only if bf16 rounding
    moves it from the true top k to below rank 1.5k (or at a tie below fp32 resolution, which the fp32 matmul
    breaks arbitrarily itself): none of 1,303,944 firing latents of real SmolLM2
    activations (layers 0/5/15/25/29, 8k tokens; at a margin of 0.125, 4 were), 1.7x faster than the fp32
    matmul + top-k (bench/RESULTS.md). AuxK keeps the screen's own selection and values (an auxiliary loss
    on dead latents, as the GPU's bf16 path computes it)."""
    if x.dim() != 2:
        *got, tables = _screened_encode(x.reshape(-1, x.shape[-1]), W_enc, b_enc, o)
        return (*(t.reshape(*x.shape[:-1], t.shape[-1]) for t in got), tables)  # type: ignore[return-value]
    n, d_sae = x.shape[0], W_enc.shape[0]
    xf, Wf, bf = x.float().contiguous(), W_enc.float().contiguous(), b_enc.float().contiguous()
    # The selections below read the bf16 product as is (the fused top-k widens it exactly): no float32 copy.
    out = None if o.workspace is None else o.workspace.pre_activations(n, d_sae, torch.bfloat16, x.device)
    pre = torch.mm(xf.to(torch.bfloat16), weight_as(Wf, torch.bfloat16, o.reuse).T, out=out)
    if o.per_batch:
        values, indices = _screened_batch_top_k(pre, xf, Wf, bf, o)
    else:
        values, indices = shortlist_rerank(pre, xf, Wf, bf, o.k, o.k + max(1, round(o.k * SCREEN_MARGIN)))
    values = values.to(W_enc.dtype).clamp_min_(0)
    if o.dead is not None:
        aux_values, aux_indices = top_k(pre, o.k_aux, bias=bf.masked_fill(~o.dead, float("-inf")))
        aux_values = aux_values.to(W_enc.dtype).clamp_min_(0)
    else:
        aux_values, aux_indices = values.new_zeros(n, 0), indices.new_zeros(n, 0)
    return values, indices, aux_values, aux_indices, (xf, Wf)


def _screened_batch_top_k(pre: Tensor, x: Tensor, W: Tensor, bias: Tensor, o: _EncodeOptions) -> tuple[Tensor, Tensor]:
    """BatchTopK's selection on the bf16 screen: each token's 2k largest, exact, are the candidates. A token whose every
    candidate is in the batch's selection (it might hold more: a few per batch, up to 7k on real activations) gets all
    its pre-activations in fp32 instead; one such round is enough, since more candidates only raise the batch's
    threshold (and a token not saturated under the first cannot be under the second)."""
    n, d_sae = pre.shape
    m = min(d_sae, 2 * o.k)
    values, indices = shortlist_rerank(pre, x, W, bias, m, min(d_sae, m + max(1, round(m * SCREEN_MARGIN))))
    if o.rows is not None:
        values = values.masked_fill(~o.rows[:, None], float("-inf"))
    total = o.k * (n if o.rows is None else int(o.rows.sum()))
    if total <= 0 or n == 0:
        return values.new_zeros(n, 1), torch.zeros(n, 1, dtype=torch.long, device=values.device)
    flat = values.reshape(-1)
    threshold = flat.kthvalue(flat.numel() - min(total, flat.numel()) + 1).values
    saturated = (values.min(1).values >= threshold).nonzero()[:, 0] if m < d_sae else values.new_zeros(0, dtype=torch.long)
    if len(saturated):
        full = torch.addmm(bias, x[saturated], W.T)
        width = max(m, int((full >= threshold).sum(1).max()))
        full_values, full_indices = full.topk(width, dim=1, sorted=False)
        values = F.pad(values, (0, width - m), value=float("-inf"))
        indices = F.pad(indices, (0, width - m))
        values[saturated], indices[saturated] = full_values, full_indices
    return select_from_candidates(values, indices, total, complete=True)


class _SparseDecode(torch.autograd.Function):
    """sum_s values[n, s] * W_dec[indices[n, s]], with the decoder gradient as one grouped sum (CPU only).

    torch's own embedding_bag backward builds the (d_sae, d_model) gradient by a dense, index_add-like pass; grouping
    by latent (LatentGroups) does the same sums faster. With saescope's kernels every gather here is theirs (prefetched:
    1.2x torch's in float32), and where the step computes in bf16 they read bf16 copies of W_dec and of the output's
    gradient (2x fewer bytes), summing in float32: a bf16 step's decoder, as its encoder, reads bf16 weights.
    """

    @staticmethod
    def forward(ctx, indices, values, W_dec, groups, gather_dtype, reuse):  # type: ignore[override]
        ctx.save_for_backward(indices, values, W_dec)
        ctx.groups, ctx.gather_dtype = groups, gather_dtype
        ctx.table = weight_as(W_dec, gather_dtype, reuse)
        return token_bags(ctx.table, indices, values)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        indices, values, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_values = gathered_dots(grad_out.contiguous(), ctx.table, indices).to(values.dtype)
        if ctx.needs_input_grad[2]:
            groups = ctx.groups or LatentGroups(indices, W_dec.shape[0])
            grad_W = groups.weighted_sum(values, grad_out.to(ctx.gather_dtype)).to(W_dec.dtype)
        ctx.table = None
        return None, grad_values, grad_W, None, None, None


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, groups: LatentGroups | None = None, *,
                  ragged: bool = False, live: Tensor | None = None, gather_dtype: torch.dtype | None = None) -> Tensor:
    """(n, k) latents and their values -> (n, d_model), without the bias; `groups` of these indices, when
    already built, save the backward an argsort. `ragged`: a code padded with zero values to its widest token (a
    threshold or batch selection) is decoded from its nonzero entries alone (or its `live` ones, when given).
    `gather_dtype`: the step's compute dtype; where it is bf16, on a CPU with saescope's kernels, the gathers (forward and
    backward) read a bf16 copy of W_dec (default: W_dec itself)."""
    values = values.to(W_dec.dtype)
    if ragged and indices.dim() == 2 and indices.shape[0] > 0:
        pairs = Ragged.of(indices, values.detach() != 0 if live is None else live)
        return pairs.bags(values[pairs.mask], W_dec)
    if W_dec.device.type != "cpu" or indices.shape[-1] == 0:  # the grouped backward is measured faster on CPU only; GPUs keep torch's
        return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values)
    gather_dtype = torch.bfloat16 if bf16_gathers(W_dec.device, gather_dtype) else W_dec.dtype
    return _SparseDecode.apply(indices, values, W_dec, groups, gather_dtype, not torch.is_grad_enabled())
