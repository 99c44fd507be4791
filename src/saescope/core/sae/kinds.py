"""The SAE kinds beside top-k (saescope.core.sae.topk), each a selection rule on the shared parameters (base.SAE):

    batchtopk   Bussmann et al. 2024: while training, the k x tokens largest ReLU'd pre-activations of the whole batch;
                at inference one threshold theta, a running estimate kept while training (an exponential mean over
                steps of the smallest value the batch kept): z = ReLU(pre) where pre > theta. L0 varies per token, about
                k on average.
    matryoshka  Bussmann et al. 2025, Nabeshima 2025: BatchTopK whose dictionary prefixes (the first d_sae/16, /8, /4,
                /2 latents, then all) each reconstruct x on their own; the prefixes' FVUs are summed into the loss, so
                that early latents carry general features and later ones refine them (less absorption).
    jumprelu    Rajamanoharan et al. 2024, Gemma Scope: a threshold per latent, z = pre * H(pre - theta_i). theta is
                learned through a straight-through estimator (a rectangle kernel of bandwidth eps), with an L0 loss
                l0_coef * (L0 / k - 1)^2 that holds the mean L0 near k. theta is kept in fp32 (log-parametrised)
                whatever the other weights' dtype: a bf16 threshold silently stops learning (SAELens PR 728). Raw
                residual streams are not normalised, so theta starts where the first batch's L0 is k, and eps is a
                fraction of the pre-activations' spread (init_from_batch).
    relu        SAELens "standard": z = ReLU(pre), every positive latent (read from files; not trained here).
    gated       Rajamanoharan et al. 2024: z = 1[W_enc x + b_gate > 0] * ReLU(exp(r_mag) * (W_enc x) + b_mag) (read from
                files; not trained here).

A kind with a threshold fires a varying number of latents per token; its codes are padded with zero values to the
widest token of the batch (base.SparseCode). A control of such a kind (random directions) has no learned threshold:
its threshold is NaN and it keeps each token's k largest (the same mean sparsity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saescope.core.errors import SaescopeError
from saescope.core.sae.base import SAE, SAEConfig, SparseCode
from saescope.core.sae.fast import LatentGroups, Ragged, Workspace, fused_topk_encode, sparse_decode, threshold_code, top_k

# BatchTopK's running threshold: an exponential mean over the last ~20 steps. Pre-activations shrink early in training, so
# a longer memory keeps a short run's threshold too high (SmolLM2 layer 15, k 32, 78 steps: held-out L0 15.6 at 0.01,
# 28.6 at 0.05).
THRESHOLD_MOMENTUM = 0.05
BANDWIDTH = 0.05  # JumpReLU's kernel width, as a fraction of the pre-activations' median standard deviation
# JumpReLU's log-thresholds learn at this multiple of the run's rate. Adam moves a log-threshold by about lr per step, but
# a pre-activation by far more (every encoder weight moves by about lr, times |x|_1): at 1x the thresholds fall behind the
# encoder and L0 collapses (SmolLM2 layer 15, k 32, 234 steps from a cache: L0 11 at 1x; 32 at 10x and 30x).
THRESHOLD_LR_SCALE = 10.0


def _pre(sae: SAE, x: Tensor) -> Tensor:
    """Dense pre-activations in the SAE's compute dtype, as fp32 values."""
    cd = sae.compute_dtype
    return F.linear(sae.encoder_input(x).to(cd), sae.W_enc.to(cd), sae.b_enc.to(cd)).float()


def _topk_train_code(sae: SAE, x: Tensor, dead: Tensor | None, k_aux: int, workspace: Workspace | None,
                     keep: Tensor | None, per_batch: bool) -> tuple[SparseCode, SparseCode | None]:
    """The k largest per token (per_batch False) or the k x tokens largest of the batch, and the AuxK code."""
    fast = fused_topk_encode(x, sae.W_enc, sae.b_enc, k=sae.cfg.k, compute_dtype=sae.compute_dtype,
                             dead=dead, k_aux=k_aux, workspace=workspace, per_batch=per_batch, rows=keep,
                             centre=sae.b_dec if sae.centred else None,
                             with_groups=torch.is_grad_enabled() and sae.W_enc.requires_grad)
    aux = SparseCode(fast.aux_indices, fast.aux_values) if k_aux > 0 else None
    return SparseCode(fast.indices, fast.values, fast.groups), aux


class BatchTopKSAE(SAE):
    kind = "batchtopk"
    ragged = True
    global_selection = True

    def __init__(self, cfg: SAEConfig, **kw):
        super().__init__(cfg, **kw)
        # NaN: not estimated yet (a fresh or a control SAE): inference then keeps each token's k largest
        self.register_buffer("threshold", torch.full((), float("nan"), dtype=torch.float32, device=self.W_enc.device))

    def encode(self, x: Tensor) -> SparseCode:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        pre = _pre(self, flat)
        if torch.isfinite(self.threshold):
            values, indices = threshold_code(pre, float(self.threshold))
        else:
            values, indices = top_k(pre, self.cfg.k)
            values = values.clamp_min(0)
        return SparseCode(indices.reshape(*lead, -1), values.to(self.W_enc.dtype).reshape(*lead, -1))

    def train_code(self, x: Tensor, dead: Tensor | None, k_aux: int, workspace: Workspace | None,
                   keep: Tensor | None = None) -> tuple[SparseCode, SparseCode | None]:
        return _topk_train_code(self, x, dead, k_aux, workspace, keep, per_batch=not self.per_token)

    @torch.no_grad()
    def end_warmup(self, x: Tensor) -> None:
        self.threshold.fill_(float("nan"))  # estimated afresh from the batch-wide selection's own steps

    @torch.no_grad()
    def after_step(self, code: SparseCode, keep: Tensor) -> None:
        if self.per_token:  # each token's k largest say nothing of the batch-wide threshold
            return
        kept = code.values[keep] if keep.dtype == torch.bool else code.values
        positive = kept[kept > 0]
        if positive.numel():
            smallest = positive.min().float()
            if torch.isfinite(self.threshold):
                self.threshold.mul_(1 - THRESHOLD_MOMENTUM).add_(THRESHOLD_MOMENTUM * smallest)
            else:
                self.threshold.copy_(smallest)

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach().reshape(1)}

    @torch.no_grad()
    def load_extra(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.copy_(tensors["threshold"].reshape(()).float())


def matryoshka_prefixes(d_sae: int) -> list[int]:
    """The nested dictionary sizes: d_sae/16, /8, /4, /2 (those that are whole and at least 1), then d_sae."""
    return sorted({d_sae // f for f in (16, 8, 4, 2) if d_sae % f == 0 and d_sae // f >= 1} | {d_sae})


class MatryoshkaSAE(BatchTopKSAE):
    kind = "matryoshka"

    def extra_loss(self, x: Tensor, code: SparseCode, w: Tensor | None, variance: Tensor) -> Tensor | None:
        """The FVU of each proper prefix's reconstruction (the full dictionary's is the main loss already)."""
        total = None
        for size in matryoshka_prefixes(self.cfg.d_sae)[:-1]:
            values = code.values * (code.indices < size)
            x_hat = sparse_decode(code.indices, values, self.W_dec, ragged=True) + self.b_dec
            err = (x - x_hat).pow(2)
            fvu = (err if w is None else err * w).sum() / variance
            total = fvu if total is None else total + fvu
        return total


class _JumpReLUEncode(torch.autograd.Function):
    """JumpReLU's training code: per token, the latents that fire (pre > theta) or lie within eps/2 below their
    threshold (zero in the forward; the estimator's gradient for theta comes from both sides of it), and each token's
    L0, with the straight-through gradients of Rajamanoharan et al. (a rectangle kernel K(u) = 1[|u| < 1/2]):

        d z / d pre = H(pre - theta)           d z / d theta = -(theta / eps) K((pre - theta) / eps)
        d L0 / d pre = 0                       d L0 / d theta = -(1 / eps) K((pre - theta) / eps)

    Only those entries carry a gradient, so the backward touches them alone (as top-k's does), not tokens x d_sae.
    `keep` (tokens,) bool: a left-out token (an outlier) fires nothing."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, eps, keep):  # type: ignore[override]
        pre = torch.addmm(b_enc, x, W_enc.T)
        margin = pre - (theta - eps / 2)
        if keep is not None:
            margin = margin.masked_fill_(~keep[:, None], float("-inf"))
        width = max(1, int((margin > 0).sum(1).max()))
        score, indices = top_k(margin, width)
        live = score > 0
        picked = pre.gather(1, indices)
        theta_at = theta[indices]
        on = (picked > theta_at) & live
        ctx.save_for_backward(x, W_enc, indices, picked, theta_at, live, on)
        ctx.eps, ctx.d_sae = eps, W_enc.shape[0]
        ctx.mark_non_differentiable(indices, live)
        return picked * on, indices, live, on.sum(1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_values, _gi, _gl, grad_l0):  # type: ignore[override]
        x, W_enc, indices, picked, theta_at, live, on = ctx.saved_tensors
        near = (live & ((picked - theta_at).abs() < ctx.eps / 2)).to(x.dtype)
        grad_pre = grad_values * on
        grad_theta_pairs = near * (grad_values * (-theta_at / ctx.eps) + grad_l0[:, None] * (-1.0 / ctx.eps))
        grad_theta = x.new_zeros(ctx.d_sae).index_add_(0, indices.reshape(-1), grad_theta_pairs.reshape(-1))
        pairs = Ragged.of(indices, grad_pre != 0)
        g = grad_pre[pairs.mask]
        groups = LatentGroups(pairs.latents, ctx.d_sae, tokens=pairs.tokens)
        grad_x = pairs.bags(g, W_enc) if ctx.needs_input_grad[0] else None
        return grad_x, groups.weighted_sum(g, x), groups.sum(g), grad_theta, None, None


class JumpReLUSAE(SAE):
    kind = "jumprelu"
    ragged = True
    uses_auxk = False  # its sparsity is its own loss; AuxK's top-k among dead latents has no k to stand on here
    global_selection = True

    def __init__(self, cfg: SAEConfig, *, l0_coef: float = 1.0, **kw):
        super().__init__(cfg, **kw)
        self.l0_coef = l0_coef
        self.log_threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=torch.float32, device=self.W_enc.device))
        # The STE's kernel width, in the units of the pre-activations: set from the first batch (init_from_batch)
        self.register_buffer("bandwidth", torch.full((), 0.05, dtype=torch.float32, device=self.W_enc.device))

    def optimizer_groups(self) -> list[dict]:
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": rest}, {"params": [self.log_threshold], "lr_scale": THRESHOLD_LR_SCALE}]

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """Start every latent's threshold where the batch's mean L0 is k (BatchTopK's threshold of the first batch), so
        that training starts at the asked sparsity whatever the scale of the activations, and the kernel width at
        BANDWIDTH x the pre-activations' typical spread (Gemma Scope's fixed 0.001 assumes normalised inputs)."""
        if x.shape[0] == 0:
            return
        pre = _pre(self, x).clamp_min(0)
        flat = pre.reshape(-1)
        total = min(self.cfg.k * x.shape[0], flat.numel())
        theta = flat.kthvalue(flat.numel() - total + 1).values.clamp_min(1e-6)
        self.log_threshold.fill_(float(theta.log()))
        self.bandwidth.fill_(float(BANDWIDTH * _pre(self, x).std(0).median().clamp_min(1e-6)))

    @torch.no_grad()
    def end_warmup(self, x: Tensor) -> None:
        self.init_from_batch(x)  # the thresholds (and kernel width) where the warmed-up encoder's batch L0 is k

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> SparseCode:
        lead = x.shape[:-1]
        pre = _pre(self, x.reshape(-1, x.shape[-1]))
        theta = self.threshold.detach()
        if torch.isfinite(theta).all():
            values, indices = threshold_code(pre, theta)
        else:  # a control: no learned thresholds
            values, indices = top_k(pre, self.cfg.k)
            values = values.clamp_min(0)
        return SparseCode(indices.reshape(*lead, -1), values.to(self.W_enc.dtype).reshape(*lead, -1))

    def train_code(self, x: Tensor, dead: Tensor | None, k_aux: int, workspace: Workspace | None,
                   keep: Tensor | None = None) -> tuple[SparseCode, SparseCode | None]:
        if self.per_token:  # the warm-up: each token's k largest, no L0 loss, the thresholds untouched
            self._l0 = None
            return _topk_train_code(self, x, None, 0, workspace, keep, per_batch=False)[0], None
        values, indices, live, self._l0 = _JumpReLUEncode.apply(self.encoder_input(x.float()), self.W_enc.float(),
                                                                self.b_enc.float(),
                                                                self.threshold, float(self.bandwidth), keep)
        return SparseCode(indices, values.to(self.W_enc.dtype), live=live), None

    def extra_loss(self, x: Tensor, code: SparseCode, w: Tensor | None, variance: Tensor) -> Tensor | None:
        if self._l0 is None:
            return None
        l0 = self._l0 if w is None else self._l0 * w[:, 0]
        mean_l0 = l0.sum() / (w.sum() if w is not None else torch.tensor(float(l0.numel()))).clamp_min(1)
        return self.l0_coef * (mean_l0 / self.cfg.k - 1).pow(2)

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach()}

    @torch.no_grad()
    def load_extra(self, tensors: dict[str, Tensor]) -> None:
        theta = tensors["threshold"].float().reshape(-1)
        if theta.shape != (self.cfg.d_sae,):
            raise SaescopeError(f"a JumpReLU threshold must hold one value per latent ({self.cfg.d_sae}), got {tuple(theta.shape)}")
        self.log_threshold.copy_(theta.clamp_min(1e-30).log().masked_fill(theta <= 0, float("-inf")))


class ReLUSAE(SAE):
    kind = "relu"
    ragged = True

    def encode(self, x: Tensor) -> SparseCode:
        lead = x.shape[:-1]
        values, indices = threshold_code(_pre(self, x.reshape(-1, x.shape[-1])), 0.0)
        return SparseCode(indices.reshape(*lead, -1), values.to(self.W_enc.dtype).reshape(*lead, -1))

    def train_code(self, x, dead, k_aux, workspace, keep=None):
        raise SaescopeError("relu SAEs are read from SAELens files, not trained here (train topk, batchtopk, jumprelu or "
                            "matryoshka)")


class GatedSAE(SAE):
    kind = "gated"
    ragged = True

    def __init__(self, cfg: SAEConfig, **kw):
        super().__init__(cfg, **kw)
        z = dict(dtype=self.W_enc.dtype, device=self.W_enc.device)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, **z))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, **z))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, **z))

    def encode(self, x: Tensor) -> SparseCode:
        """b_enc holds what is subtracted-and-folded before the encoder (W_enc b_dec for SAELens files): W_enc x + b_enc
        is the gate's and the magnitude's common product, each adding its own bias."""
        lead = x.shape[:-1]
        proj = _pre(self, x.reshape(-1, x.shape[-1]))
        gate = proj + self.b_gate.float()
        mag = F.relu(self.r_mag.float().exp() * proj + self.b_mag.float())
        values, indices = threshold_code(torch.where(gate > 0, mag, torch.zeros_like(mag)), 0.0)
        return SparseCode(indices.reshape(*lead, -1), values.to(self.W_enc.dtype).reshape(*lead, -1))

    def train_code(self, x, dead, k_aux, workspace, keep=None):
        raise SaescopeError("gated SAEs are read from SAELens files, not trained here (train topk, batchtopk, jumprelu or "
                            "matryoshka)")

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"b_gate": self.b_gate.detach(), "r_mag": self.r_mag.detach(), "b_mag": self.b_mag.detach()}

    @torch.no_grad()
    def load_extra(self, tensors: dict[str, Tensor]) -> None:
        for name in ("b_gate", "r_mag", "b_mag"):
            getattr(self, name).copy_(tensors[name].reshape(-1))
