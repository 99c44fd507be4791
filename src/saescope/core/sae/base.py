"""The interface every SAE kind shares (saescope.core.sae.SAE_KINDS): the parameters, their initialisation, decode,
the training forward and the decoder-norm constraint are written here once; a kind says how it selects latents
(`encode` at inference, `train_code` while training) and what it adds to the loss (`extra_loss`).

    encode(x)      -> SparseCode: per token, its firing latents and their values, padded with zero values to the
                      widest token (a kind with a threshold fires a varying number of latents per token)
    decode(code)   -> x_hat = sum_i z_i W_dec[i] + b_dec
    forward(x, ..) -> ForwardOutput: reconstruction, FVU, AuxK on dead latents, and the kind's own loss term

Parameters: W_enc (d_sae, d_model), b_enc (d_sae,), W_dec (d_sae, d_model) with unit-norm rows, b_dec (d_model,), and
what a kind adds (a threshold: `extra_tensors`). Nothing is subtracted from x before the encoder (the Qwen-Scope
convention; formats that subtract b_dec are folded into b_enc on import).

    init:    W_dec rows random unit vectors, W_enc = W_dec (tied), b_dec = data mean, b_enc = -W_enc b_dec
    FVU:     sum |x - x_hat|^2 / sum |x - mean(x)|^2
    AuxK:    e = x - x_hat (a constant), z_aux = TopK_{k_aux} of the pre-activations of the dead latents only,
             auxk = min(n_dead / k_aux, 1) sum |W_dec z_aux - e|^2 / sum |e - mean(e)|^2, k_aux = min(d_model / 2, n_dead)
    constraint: unit-norm decoder rows: the gradient along each row is projected out before the optimiser step, and
             the rows are renormalised after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saescope.core.errors import SaescopeError
from saescope.core.sae.cpu_kernels import normalize_rows_, project_out_row_norm_
from saescope.core.sae.fast import LatentGroups, Workspace, sparse_decode


@dataclass(frozen=True)
class SAEConfig:
    d_model: int
    d_sae: int
    k: int  # latents kept per token (top-k); the target or mean L0 of the kinds whose L0 varies
    kind: str = "topk"

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.d_sae <= 0:
            raise SaescopeError(f"d_model and d_sae must be positive, got {self.d_model} and {self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise SaescopeError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")


@dataclass
class SparseCode:
    """Per-token sparse code: each token's firing latents and their values (>= 0; 0 means 'not firing': the padding of a
    token that fires fewer latents than the widest one). Code that reads codes counts values > 0, never the width."""

    indices: Tensor  # (..., k) int64
    values: Tensor  # (..., k)
    groups: LatentGroups | None = None  # of a training forward: shared by the encoder's and decoder's backward
    # of a training forward whose zero values still carry gradient (JumpReLU's latents just below threshold): the
    # entries a ragged decode keeps (default: the nonzero values)
    live: Tensor | None = None

    def dense(self, d_sae: int) -> Tensor:
        # a sum, not a write: a padded code may name a latent twice (once firing, once as a zero-valued pad)
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter_add_(-1, self.indices, self.values)


@dataclass
class ForwardOutput:
    x_hat: Tensor
    code: SparseCode
    fvu: Tensor  # fraction of variance unexplained, the main loss
    auxk_fvu: Tensor  # AuxK loss (0 when no latent is dead)
    extra: Tensor | None = None  # the kind's own loss term (a sparsity penalty, nested reconstructions), weighted


def reference_decode(code: SparseCode, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """x_hat = z @ W_dec (+ b_dec) = sum_i z_i W_dec[i] (+ b_dec), z the dense (..., d_sae) code."""
    out = code.dense(W_dec.shape[0]).to(W_dec.dtype) @ W_dec
    return out if b_dec is None else out + b_dec


class SAE(nn.Module):
    """An SAE of any kind; see the module doc. Subclasses set `kind` and implement `encode` and `train_code`."""

    kind: ClassVar[str] = ""
    uses_auxk: ClassVar[bool] = True  # AuxK revives dead latents; a kind with its own sparsity loss may not want it
    # Codes padded to their widest token (L0 varies per token): decoded from their nonzero entries (fast.Ragged)
    ragged: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if cfg.kind != self.kind:
            raise SaescopeError(f"a {type(self).__name__} is of kind {self.kind!r}, its config says {cfg.kind!r}")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_model, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_model, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model, dtype=dtype, device=device))
        # The dtype of the encoder matmul and top-k; bf16 halves their cost, master weights stay fp32.
        self.compute_dtype = dtype
        # Where the SAE belongs (model, layer, origin format): carried along, never used by the maths.
        self.meta: dict = {}
        # Encode and decode through saescope.core.sae.fast; False runs the plain reference maths instead.
        self.fused = True
        # Training only: encode x - b_dec (Gao et al.'s pre-encoder bias), so that the encoder's bias follows the decoder's
        # as b_dec learns the data's mean. Saved folded into b_enc (saved_b_enc): every file encodes x @ W_enc.T + b_enc.
        self.centred = False

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
        if self.centred:
            self.b_enc.zero_()
        else:
            self.b_enc.copy_(-(self.W_enc @ mean))

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder reads: x, or x - b_dec while training centred."""
        return x - self.b_dec.to(x.dtype) if self.centred else x

    @torch.no_grad()
    def saved_b_enc(self) -> Tensor:
        """b_enc as files hold it: a centred SAE's x - b_dec folded in, b_enc - W_enc @ b_dec (the same pre-activations)."""
        return self.b_enc - self.W_enc @ self.b_dec if self.centred else self.b_enc

    def optimizer_groups(self) -> list[dict]:
        """The optimiser's parameter groups; a group's "lr_scale" multiplies the run's learning rate for it."""
        return [{"params": list(self.parameters())}]

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """What a kind sets from the first training batch (tokens, d_model), after init_b_dec (a threshold's start)."""

    # A kind whose selection is not each token's k largest (a batch's k x tokens largest, a threshold per latent) trains
    # with each token's k largest while `per_token` is set (the trainer's per-token warm-up), then its own rule: from a
    # random init, a batch-wide selection gives the largest-norm tokens dozens of latents and the rest none, so the
    # decoder learns from the tokens it already fits (ground truth, bench/RESULTS.md: BatchTopK recovers 0.37 of the
    # true features without the warm-up, 0.83 with half the steps per token; top-k 0.83).
    global_selection = False
    per_token = False

    @torch.no_grad()
    def end_warmup(self, x: Tensor) -> None:
        """The first step of the kind's own selection after a per-token warm-up, on that step's batch (tokens, d_model):
        restart what the warm-up left stale (a threshold)."""

    # ---- what a kind implements ----
    def encode(self, x: Tensor) -> SparseCode:
        """Each token's (..., d_model) firing latents and their values."""
        raise NotImplementedError

    def train_code(self, x: Tensor, dead: Tensor | None, k_aux: int, workspace: Workspace | None,
                   keep: Tensor | None = None) -> tuple[SparseCode, SparseCode | None]:
        """The differentiable code of x (tokens, d_model) for training and, when k_aux > 0, the AuxK code among the
        `dead` latents. `keep` (tokens,) bool: the tokens the losses count (the others, outliers, must not take a
        batch-wide selection's budget)."""
        raise NotImplementedError

    def extra_loss(self, x: Tensor, code: SparseCode, w: Tensor | None, variance: Tensor) -> Tensor | None:
        """The kind's own loss term (weighted, added to FVU and AuxK), or None."""
        return None

    @torch.no_grad()
    def after_step(self, code: SparseCode, keep: Tensor) -> None:
        """What a kind updates after an optimiser step from the step's code (a running threshold)."""

    def extra_tensors(self) -> dict[str, Tensor]:
        """What a kind stores beside the four weights in its file (a threshold)."""
        return {}

    @torch.no_grad()
    def load_extra(self, tensors: dict[str, Tensor]) -> None:
        """Restore what `extra_tensors` saved."""

    # ---- shared maths ----
    def pre_activations(self, x: Tensor, latents: Tensor | None = None) -> Tensor:
        """Dense pre-activations x @ W_enc.T + b_enc of chosen latents, differentiable in x and W_enc."""
        x = self.encoder_input(x)
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
        live = code.live.reshape(idx.shape) if code.live is not None else None
        out = sparse_decode(idx, val, self.W_dec, groups, ragged=self.ragged, live=live, gather_dtype=self.compute_dtype) + self.b_dec
        return out.reshape(*lead, self.cfg.d_model)

    def reconstruct(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return self.decode(self.encode(flat)).reshape(shape).to(x.dtype)

    def forward(self, x: Tensor, dead: Tensor | None = None, *, n_dead: int | None = None,
                weights: Tensor | None = None, variance: Tensor | None = None,
                workspace: Workspace | None = None, auxk_share: float = 1.0) -> ForwardOutput:
        """Training forward on (tokens, d_model): reconstruction, FVU, the AuxK loss on `dead` latents, and the kind's
        own loss term.

        `weights` (tokens,) of 0/1 leave tokens out of every loss without changing shapes (the outlier
        filter uses it, so no host sync is needed to know how many tokens remain). `variance` is FVU's
        denominator, sum w |x - mean(x)|^2; pass it when x is one shard of a larger batch so that the
        shards' losses add up to the whole batch's. `n_dead` saves a sync when the caller knows it.
        `workspace` holds the pre-activations between steps (see `fast.Workspace`; the reference ignores it).
        `auxk_share` < 1 computes AuxK on the batch's first ceil(share x tokens) tokens (at least 2) only (a trainer's batches are
        shuffled, so they are a sample), densely over the dead latents (`_sampled_auxk`): its cost falls with the share.
        """
        x = x.to(self.W_enc.dtype)
        if dead is not None and n_dead is None:
            n_dead = int(dead.sum())
        k_aux = min(self.cfg.d_model // 2, n_dead or 0) if self.uses_auxk else 0
        sampled = k_aux > 0 and auxk_share < 1
        code, aux = self.train_code(x, None if sampled else dead, 0 if sampled else k_aux, workspace,
                                    None if weights is None else weights > 0)
        x_hat = self.decode(code)
        w = weights.to(x.dtype)[:, None] if weights is not None else None
        if variance is None:
            variance = centred_sum_sq(x, w)
        fvu = weighted_sq_error(x_hat, x, weights) / variance
        if sampled:
            auxk = self._sampled_auxk(x, x_hat, dead, n_dead, k_aux, weights, auxk_share)
        elif k_aux > 0:
            # The dead latents learn to predict the live latents' residual (Gao et al. section A.2).
            residual = (x - x_hat).detach()
            aux_hat = (sparse_decode(aux.indices, aux.values, self.W_dec, gather_dtype=self.compute_dtype) if self.fused
                       else reference_decode(aux, self.W_dec))
            auxk = auxk_loss(aux_hat, residual, weights, n_dead, k_aux)
        else:
            auxk = fvu.new_zeros(())
        return ForwardOutput(x_hat, code, fvu, auxk, self.extra_loss(x, code, w, variance))

    def _sampled_auxk(self, x: Tensor, x_hat: Tensor, dead: Tensor, n_dead: int, k_aux: int, weights: Tensor | None,
                      share: float) -> Tensor:
        """AuxK on the first ceil(share x tokens) tokens, as dense products over the dead latents alone: the same loss
        as the full batch's in expectation, at share x (tokens x dead) the cost, where the full batch's sparse
        gathers of k_aux latents per token cost as much as the rest of the step (bench/RESULTS.md, "AuxK on a sample")."""
        m = min(x.shape[0], max(2, math.ceil(share * x.shape[0])))  # one token has no variance to explain
        idx = dead.nonzero().squeeze(1)
        xs, residual = x[:m], (x[:m] - x_hat[:m]).detach()
        cd = self.compute_dtype
        pre = F.linear(self.encoder_input(xs).to(cd), self.W_enc[idx].to(cd), self.b_enc[idx].to(cd))
        values, chosen = pre.topk(k_aux, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, chosen, values.relu())
        aux_hat = (z @ self.W_dec[idx].to(cd)).to(x.dtype)
        return auxk_loss(aux_hat, residual, None if weights is None else weights[:m], n_dead, k_aux)

    # ---- the decoder-norm constraint ----
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each decoder row's gradient the part that would change its norm."""
        if self.W_dec.grad is not None:
            project_out_row_norm_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        normalize_rows_(self.W_dec)


def weighted_sq_error(a: Tensor, b: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum_n weights[n] |a[n] - b[n]|^2 over (tokens, d) rows (weights (tokens,), or all 1): the reconstruction loss in
    three passes over the rows (difference, row norms; the gradient in one), where autograd's sub / pow / mul / sum and
    their backwards take eight."""
    return _WeightedSqError.apply(a, b, weights)


class _WeightedSqError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, weights):  # type: ignore[override]
        diff = a - b
        per_row = torch.linalg.vecdot(diff, diff)
        ctx.save_for_backward(diff, weights)
        return per_row.sum() if weights is None else per_row @ weights.to(per_row.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        diff, weights = ctx.saved_tensors
        scale = 2 * grad if weights is None else (2 * grad) * weights.to(diff.dtype)[:, None]
        grad_a = diff * scale
        return grad_a if ctx.needs_input_grad[0] else None, -grad_a if ctx.needs_input_grad[1] else None, None


def auxk_loss(aux_hat: Tensor, residual: Tensor, weights: Tensor | None, n_dead: int, k_aux: int) -> Tensor:
    """min(n_dead / k_aux, 1) |aux_hat - residual|^2 / the residual's centred sum of squares, over the weighted tokens
    (weights (tokens,) or all 1); 0 where the residual has no variance (one kept token)."""
    w = None if weights is None else weights.to(residual.dtype)[:, None]
    auxk = min(n_dead / k_aux, 1.0) * weighted_sq_error(aux_hat, residual, weights) / centred_sum_sq(residual, w)
    return torch.nan_to_num(auxk, nan=0.0)


def centred_sum_sq(x: Tensor, w: Tensor | None) -> Tensor:
    if w is None:
        return (x - x.mean(0)).pow(2).sum()
    mean = (x * w).sum(0) / w.sum().clamp_min(1)
    return ((x - mean).pow(2) * w).sum().clamp_min(torch.finfo(x.dtype).tiny)


def default_lr(d_sae: int) -> float:
    """Gao et al.'s scaling of the Adam learning rate with the dictionary width."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
