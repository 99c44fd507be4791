"""SASFT's auxiliary loss (Qwen-Scope report section 7; Deng et al. 2026):

    L_reduce = mean over tokens t of  sum over s in S of ReLU(f_s(h_t) - alpha_s)
    total    = CE + lambda * L_reduce

f_s is feature s's pre-activation W_enc[s] . h + b_enc[s] on the output h of decoder layer L, read from the training
forward pass itself through the one layer hook (saescope.core.models.layer_hooks): no second forward, and the gradient
flows into the model (or its LoRA adapters) through h. alpha_s is the feature's mean pre-activation over the training
data's tokens before fine-tuning (`estimate_alpha`): the loss leaves a feature's ordinary level alone and pushes
down only what rises above it. Tokens: every non-padding position except the first (the attention sink, whose
norm is hundreds of times the rest).

Gradient checkpointing: transformers (5.x) does not re-run forward hooks when it recomputes a layer, but the hidden
state the hook saw in the first forward is still the graph's output of that layer, so the gradient is the same with
and without checkpointing (tests/sasft/test_sasft.py checks it, with and without use_reentrant). A hidden state
that carries no gradient while training (a checkpointing mode that cuts the graph, or a model whose weights up to
layer L are all frozen) is refused with a clear error instead of silently training without the auxiliary term.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saescope.core.errors import SaescopeError
from saescope.core.models import layer_hooks
from saescope.core.sae import SAE


@dataclass
class StepStats:
    l_reduce: float
    fire_rate: float  # share of tokens where any target feature is among the SAE's top-k (and > 0)
    per_feature: list[float]


class FeatureSuppression:
    """The auxiliary loss for one layer and a set of features. Use `watch(model)` around the training forward, then
    `loss(mask)` for lambda * L_reduce (a tensor in the graph) and `stats` for what to log."""

    def __init__(self, sae: SAE, *, layer: int, features: Sequence[int], lam: float,
                 alpha: Tensor | None = None, control: SAE | None = None):
        features = [int(f) for f in features]
        if not features:
            raise SaescopeError("SASFT needs at least one feature to suppress")
        bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise SaescopeError(f"feature {bad[0]} is out of range: the layer {layer} SAE has features 0..{sae.cfg.d_sae - 1}")
        if len(set(features)) < len(features):
            raise SaescopeError(f"feature {next(f for f in features if features.count(f) > 1)} is given twice")
        if not lam >= 0 or lam != lam or lam == float("inf"):
            raise SaescopeError(f"lambda must be a finite number >= 0, got {lam}")
        self.layer, self.features, self.lam = layer, features, float(lam)
        idx = torch.tensor(features)
        # The firing test uses the SAE whose directions are penalised: the trained one, or for the control arm the
        # control SAE (saescope.api.controls, the same feature ids), so both report "fires" by the same rule.
        if control is not None and (control.cfg.d_model, control.cfg.d_sae) != (sae.cfg.d_model, sae.cfg.d_sae):
            raise SaescopeError(f"the control is {control.cfg.d_model} x {control.cfg.d_sae}, the SAE {sae.cfg.d_model} x "
                                f"{sae.cfg.d_sae}: make it with saescope control random --like the SAEs")
        self.sae = sae if control is None else control
        self.is_control = control is not None
        w = self.sae.W_enc.detach()[idx].float().cpu()
        if control is not None:  # the control's random unit rows, rescaled to the trained encoder rows' norms
            w = w * sae.W_enc.detach()[idx].float().cpu().norm(dim=1, keepdim=True)
            b = -(w @ sae.b_dec.detach().float().cpu())
        else:
            b = sae.b_enc.detach()[idx].float().cpu()
        self.W, self.b = w, b
        self.alpha = torch.zeros(len(features)) if alpha is None else alpha.detach().float().cpu()
        if self.alpha.shape != (len(features),):
            raise SaescopeError(f"alpha must hold one value per feature ({len(features)}), got shape {tuple(self.alpha.shape)}")
        self._hidden: Tensor | None = None
        self.stats: StepStats | None = None

    def describe(self) -> dict:
        return {"layer": self.layer, "features": self.features, "lambda": self.lam, "alpha": [round(float(a), 6) for a in self.alpha],
                "directions": "control" if self.is_control else "sae"}

    def pre(self, hidden: Tensor) -> Tensor:
        """(..., n_features) pre-activations of the target features, differentiable in hidden."""
        return F.linear(hidden.float(), self.W.to(hidden.device), self.b.to(hidden.device))

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        """Keep layer L's output of every forward inside the block (the training forward's own activations)."""
        def keep(hidden: Tensor) -> None:
            if model.training and not torch.is_grad_enabled():
                return  # a trainer's metrics-only forward (no_grad) in a training step: not the forward that is trained
            if model.training and not hidden.requires_grad:
                raise SaescopeError(f"layer {self.layer}'s output carries no gradient, so SASFT's loss could move nothing: "
                                    f"no trainable weight feeds it (only layers after {self.layer} train, or gradient "
                                    "checkpointing cut the graph); train weights up to that layer, or use use_reentrant=False")
            self._hidden = hidden

        self._hidden = None
        with layer_hooks(model, {self.layer: keep}):
            yield

    def loss(self, mask: Tensor | None) -> Tensor:
        """lambda * L_reduce over the kept positions of the last watched forward (mask: (batch, seq), 1 = a real token);
        sets `stats`."""
        hidden = self._hidden
        if hidden is None:
            raise SaescopeError(f"no forward pass reached layer {self.layer} inside watch()")
        self._hidden = None
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool().clone()
        keep[:, 0] = False  # the first position: the attention sink
        h = hidden[keep]
        if not h.shape[0]:
            zero = hidden.sum() * 0.0
            self.stats = StepStats(0.0, 0.0, [0.0] * len(self.features))
            return zero
        over = F.relu(self.pre(h) - self.alpha.to(h.device))
        l_reduce = over.sum(-1).mean()
        with torch.no_grad():
            code = self.sae.encode(h.detach().float())
            fires = torch.stack([((code.indices == f) & (code.values > 0)).any(-1) for f in self.features], -1)
            self.stats = StepStats(float(l_reduce), float(fires.any(-1).float().mean()), fires.float().mean(0).tolist())
        return self.lam * l_reduce


@torch.no_grad()
def estimate_alpha(model: nn.Module, suppression: FeatureSuppression, batches: Iterator[dict[str, Tensor]],
                   *, max_batches: int = 16) -> Tensor:
    """alpha_s: the feature's mean pre-activation over the tokens (first left out) of up to max_batches training
    batches, read from the model before fine-tuning. Sets it on `suppression` and returns it."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros(len(suppression.features)), 0
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            with suppression.watch(model):
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            hidden, suppression._hidden = suppression._hidden, None
            mask = batch.get("attention_mask")
            keep = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask.bool().clone()
            keep[:, 0] = False
            pre = suppression.pre(hidden[keep.to(hidden.device)])
            total += pre.sum(0).cpu()
            count += pre.shape[0]
    finally:
        model.train(was_training)
    if not count:
        raise SaescopeError("no training tokens to estimate the features' mean pre-activation (alpha) from")
    suppression.alpha = total / count
    return suppression.alpha
