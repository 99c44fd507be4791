"""Mixture-of-Experts routing: which experts each token is sent to, read off the routers themselves.

A router is the gate of a decoder layer's sparse MLP (`layer.mlp.gate` in Qwen3-MoE, Qwen2-MoE, Mixtral,
OLMoE...). Recent transformers routers return (logits, weights, indices); older ones return the logits and
let the block take the top-k. Both are read here, so the experts recorded are the ones the block used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from saescope.core.errors import SaescopeError
from saescope.core.models.load import decoder_layers


@dataclass(frozen=True)
class MoEShape:
    n_experts: int
    experts_per_token: int


def moe_shape(model: nn.Module) -> MoEShape | None:
    """Experts and experts per token of an MoE model, None for a dense one."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    return MoEShape(int(n), int(k)) if n and k else None


def router(model: nn.Module, layer: int) -> nn.Module | None:
    """The gate of decoder layer `layer`, or None when that layer's MLP is dense (e.g. Qwen3-MoE mlp_only_layers)."""
    mlp = getattr(decoder_layers(model)[layer], "mlp", None)
    gate = getattr(mlp, "gate", None) if mlp is not None else None
    shape = moe_shape(model)
    if gate is None or shape is None:
        return None
    weight = getattr(gate, "weight", None)
    return gate if weight is not None and weight.shape[0] == shape.n_experts else None


@contextmanager
def record_routing(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Within the block, every forward pass stores, per MoE layer in `layers`, the (tokens, experts_per_token)
    expert indices its router chose (tokens flattened batch-major, as the MoE block flattens them). Dense layers
    are left out of the dict."""
    shape = moe_shape(model)
    if shape is None:
        raise SaescopeError(f"{type(model).__name__} is not a Mixture-of-Experts model: it has no routers")
    got: dict[int, Tensor] = {}
    handles = []

    def make(layer: int):
        def hook(_module, _args, output):
            if isinstance(output, tuple) and len(output) >= 3:
                indices = output[2]
            else:  # logits only: the block takes the top-k itself, by the same rule
                logits = output[0] if isinstance(output, tuple) else output
                indices = logits.topk(shape.experts_per_token, dim=-1).indices
            got[layer] = indices.detach().reshape(-1, shape.experts_per_token)

        return hook

    try:
        for n in layers:
            gate = router(model, n)
            if gate is not None:
                handles.append(gate.register_forward_hook(make(n)))
        yield got
    finally:
        for h in handles:
            h.remove()
