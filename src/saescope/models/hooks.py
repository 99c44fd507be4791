"""The one way saescope touches a model's residual stream: forward hooks on decoder-layer outputs.

`layer_hooks(model, {n: fn})` calls fn(hidden) on the output of decoder layer n; fn may return a
replacement (splicing an SAE in, ablating, steering) or None (observing). `capture` builds on it
and can stop the forward pass right after the last layer it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from saescope.errors import SaescopeError
from saescope.models.load import decoder_layers

LayerFn = Callable[[Tensor], Tensor | None]


class _StopForward(Exception):
    pass


def check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    n = len(decoder_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise SaescopeError(f"layer {bad[0]} is out of range: the model has layers 0..{n - 1}")
    return sorted(set(layers))


@contextmanager
def layer_hooks(model: nn.Module, fns: dict[int, LayerFn]) -> Iterator[None]:
    blocks = decoder_layers(model)
    check_layers(model, list(fns))
    handles = []

    def make(fn: LayerFn):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    try:
        for layer, fn in fns.items():
            handles.append(blocks[layer].register_forward_hook(make(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def capture(
    model: nn.Module,
    input_ids: Tensor,
    layers: Sequence[int],
    *,
    attention_mask: Tensor | None = None,
    stop_early: bool = True,
) -> dict[int, Tensor]:
    """Run the model once and return the output of each requested decoder layer, (batch, seq, d_model).

    With stop_early the forward is cut after the last requested layer: the rest of the network and
    the unembedding are never computed.
    """
    layers = check_layers(model, layers)
    last = layers[-1]
    out: dict[int, Tensor] = {}

    def keep(layer: int) -> LayerFn:
        def fn(hidden: Tensor) -> None:
            out[layer] = hidden.detach()
            if stop_early and layer == last:
                raise _StopForward

        return fn

    with layer_hooks(model, {n: keep(n) for n in layers}), torch.no_grad():
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return out
