"""saescope: top-k sparse autoencoders on every layer of a language model, the Qwen-Scope recipe and beyond."""

from saescope.errors import SaescopeError
from saescope.io import export_saes, load_saes
from saescope.models import load_model
from saescope.sae import SAEConfig, SparseCode, TopKSAE
from saescope.scope import Scope

__all__ = ["SAEConfig", "SaescopeError", "Scope", "SparseCode", "TopKSAE", "export_saes", "load_model", "load_saes"]
__version__ = "0.1.0"
