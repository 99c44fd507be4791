"""Loading language models and hooking their decoder layers."""

from saescope.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model_dir
from saescope.models.hooks import capture, check_layers, layer_hooks
from saescope.models.load import LoadedModel, decoder_layers, load_model, parse_dtype

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel", "builtin_model_dir", "capture", "check_layers",
    "decoder_layers", "layer_hooks", "load_model", "parse_dtype",
]
