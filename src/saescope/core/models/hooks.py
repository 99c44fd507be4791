"""The one way saescope touches a model's residual stream: forward hooks on decoder-layer outputs.

`layer_hooks(model, {n: fn})` calls fn(hidden) on the output of decoder layer n; fn may return a
replacement (splicing an SAE in, ablating, steering) or None (observing). `capture` builds on it
and can stop the forward pass right after the last layer it needs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from saescope.core.errors import SaescopeError
from saescope.core.models.load import decoder_layers

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


class _Given(nn.Module):
    """Stands in for decoder blocks 0..n while the rest of the network runs: blocks before n pass their input on,
    block n outputs the given hidden state (in the block's own output type)."""

    def __init__(self, block: nn.Module, hidden: Tensor | None, as_tuple: bool):
        super().__init__()
        # The model's loop may read plain attributes of its blocks (transformers 4.5x picks each block's mask by
        # `attention_type`): the stand-in carries the block's own.
        for name, value in vars(block).items():
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, name, value)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


# whether a model's decoder blocks return tuples (transformers before 4.54, GPT-2) or the hidden state alone
_TUPLE_OUTPUT: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _blocks_return_tuples(model: nn.Module, device: torch.device) -> bool:
    if model not in _TUPLE_OUTPUT:
        seen: list[bool] = []
        handle = decoder_layers(model)[0].register_forward_hook(lambda _m, _a, out: seen.append(isinstance(out, tuple)))
        try:  # one token through the base model (no head): hooks a caller put on the model itself do not see it
            with torch.no_grad():
                getattr(model, "base_model", model)(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
        finally:
            handle.remove()
        _TUPLE_OUTPUT[model] = seen[0]
    return _TUPLE_OUTPUT[model]


@torch.no_grad()
def forward_from(model: nn.Module, layer: int, hidden: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """The logits of the model when decoder block `layer` outputs `hidden` (batch, seq, d_model): the same as a full
    forward with that output spliced in (layer_hooks), but blocks 0..layer are not run. The model itself runs the
    rest (its masks, position embeddings, final norm, head and any soft-capping), so every architecture it supports
    is resumed alike; the embedding is fed `hidden` only for its shape and dtype."""
    check_layers(model, [layer])
    blocks = decoder_layers(model)
    as_tuple = _blocks_return_tuples(model, hidden.device)
    kept = [blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            blocks[i] = _Given(kept[i], hidden if i == layer else None, as_tuple)
        return model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for i, block in enumerate(kept):
            blocks[i] = block
