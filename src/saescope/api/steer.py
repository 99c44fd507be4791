"""Steering: add `strength x decoder direction` of chosen SAE features to a layer's output at every position,
the method of the Qwen-Scope demo. Negative strengths suppress a feature.

    with steering(scope.lm.model, layer=12, vector=feature_vector(scope.saes[12], {3: 8.0, 7: -4.0})):
        model.generate(...)          # any forward or generate call inside the block is steered

`Scope.steer(layer, {feature: strength})` does both steps. Decoder rows are unit-norm, so a strength is in
the residual stream's own units: compare it with the layer's typical token norm (`typical_norm`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from saescope.core.errors import ParamError, SaescopeError
from saescope.core.models import LoadedModel, layer_hooks
from saescope.core.sae import SAE
from saescope.core.schema import check_number, escape


def feature_vector(sae: SAE, features: dict[int, float]) -> Tensor:
    """sum_f strength_f * W_dec[f], the vector added to the residual stream."""
    if not features:
        raise SaescopeError("no features to steer with")
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise SaescopeError(f"feature {bad[0]} is out of range: the SAE has features 0..{sae.cfg.d_sae - 1}")
    idx = torch.tensor(list(features), device=sae.W_dec.device)
    strength = torch.tensor(list(features.values()), dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    return (strength[:, None] * sae.W_dec.detach()[idx]).sum(0)


@contextmanager
def steering(model: nn.Module, *, layer: int, vector: Tensor) -> Iterator[None]:
    """Add `vector` (d_model,) to the output of decoder layer `layer` at every position while the block runs."""

    def add(hidden: Tensor) -> Tensor:
        return hidden + vector.to(hidden.dtype)

    with layer_hooks(model, {layer: add}):
        yield


def parse_features(spec: str, strengths: str | float) -> dict[int, float]:
    """'3,7' with '8' (one strength for all) or '8,-4' (one each) -> {3: 8.0, 7: -4.0}."""
    try:
        ids = [int(x) for x in str(spec).split(",")]  # an empty item ('3,,4') is refused, not skipped
        values = [float(x) for x in str(strengths).split(",")]
    except ValueError:
        raise SaescopeError(f"features must be integers and strengths numbers, got {spec!r} and {strengths!r}") from None
    if not ids:
        raise SaescopeError("no feature given")
    for f in ids:
        check_number(f, "feature", kind=int, min=0)
    if len(set(ids)) < len(ids):  # a dict would keep the last strength of a repeated id, silently
        raise ParamError(f"{{}} {escape(str(spec))}: feature {next(f for f in ids if ids.count(f) > 1)} is given twice", "feature")
    for v in values:
        check_number(v, "strength", kind=float)  # float() parses 'nan' and 'inf'
    if len(values) == 1:
        values = values * len(ids)
    if len(values) != len(ids):
        raise SaescopeError(f"{len(ids)} features but {len(values)} strengths: give one strength, or one per feature")
    return dict(zip(ids, values))


@torch.no_grad()
def generate(lm: LoadedModel, prompt: str, *, max_new_tokens: int = 40, chat: bool = False, temperature: float = 0.0,
             seed: int = 0) -> str:
    """The model's continuation of `prompt` (greedy unless temperature > 0); steer it by calling inside `steering`."""
    if not prompt.strip():
        raise SaescopeError("the prompt is empty")
    check_number(max_new_tokens, "max_new_tokens", kind=int, min=1)
    check_number(temperature, "temperature", kind=float, min=0)  # NaN would compare as greedy, silently
    tok = lm.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ParamError(f"{escape(lm.name)}'s tokenizer has no chat template; leave out {{}}", "chat")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat).to(lm.device)
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit and enc["input_ids"].shape[1] + max_new_tokens > limit:
        raise SaescopeError(f"the prompt has {enc['input_ids'].shape[1]} tokens; with {max_new_tokens} new ones it "
                            f"exceeds the model's context of {limit}")
    torch.manual_seed(seed)
    sample = temperature > 0
    try:
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=temperature if sample else None, top_p=None, top_k=None,
                                pad_token_id=tok.pad_token_id)
    except RuntimeError as exc:
        if "probability tensor" not in str(exc):
            raise
        # sampling from logits that overflowed: a steering strength or a temperature far out of scale
        raise SaescopeError("the next-token probabilities are not finite: the steering strength is far beyond the layer's "
                            "norm, or the temperature too small; use smaller values") from exc
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def steered_pair(lm: LoadedModel, sae: SAE, *, layer: int, features: dict[int, float], prompt: str,
                 **generate_kw) -> dict[str, str]:
    """The unsteered and the steered continuation of one prompt, with the same decoding settings."""
    vector = feature_vector(sae, features)
    plain = generate(lm, prompt, **generate_kw)
    with steering(lm.model, layer=layer, vector=vector):
        steered = generate(lm, prompt, **generate_kw)
    return {"prompt": prompt, "unsteered": plain, "steered": steered}


@torch.no_grad()
def typical_norm(lm: LoadedModel, layer: int, texts: list[str]) -> float:
    """Median norm of the layer's token vectors on `texts` (first tokens left out: the attention sink's norm is
    hundreds of times the rest), the scale a steering strength should be read against."""
    from saescope.core.models import capture

    norms = []
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
        h = capture(lm.model, ids, [layer])[layer][0]
        norms.append(h[1:].norm(dim=-1) if h.shape[0] > 1 else h.norm(dim=-1))
    return float(torch.cat(norms).median())
