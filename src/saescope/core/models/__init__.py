"""Loading language models and hooking their decoder layers."""

from saescope.core.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model_dir
from saescope.core.models.hooks import capture, check_layers, forward_from, layer_hooks
from saescope.core.models.load import LoadedModel, decoder_layers, load_model, parse_dtype, token_strings, unembed, unembedding
from saescope.core.models.routing import MoEShape, moe_shape, record_routing, router

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel", "builtin_model_dir", "capture", "check_layers",
    "decoder_layers", "forward_from", "layer_hooks", "load_model", "moe_shape", "MoEShape", "parse_dtype", "record_routing", "router",
    "token_strings", "unembed", "unembedding",
]
