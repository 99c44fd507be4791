"""saescope: top-k sparse autoencoders on every layer of a language model, the Qwen-Scope recipe and beyond.

The package is four tiers, lowest first (TIERS); each imports only the tiers below it and its own:

    core/   the SAE maths (sae), models and hooks, data, training, file formats, run folders, small utilities
    api/    Scope, steering, controls, the feature store, feature hits, behaviour metrics, evaluation and quality
    apps/   one package per application (a Config and a run_*), never importing another application
    cli/    the command line, built from the configs; nothing imports it

tests/test_layering.py reads TIERS and enforces the rules on every import of every module.
"""

TIERS = ("core", "api", "apps", "cli")
# Inside the core, the SAE maths reads no files and knows no model: it may import only these core modules.
SAE_MATHS_MAY_IMPORT = ("core.errors", "core.schema", "core.system", "core.cache")

from saescope.api.scope import Scope  # noqa: E402
from saescope.core.errors import SaescopeError  # noqa: E402
from saescope.core.io import export_saes, load_saes  # noqa: E402
from saescope.core.models import load_model  # noqa: E402
from saescope.core.sae import SAE, SAE_KINDS, SAEConfig, SparseCode, TopKSAE  # noqa: E402

__all__ = ["SAE", "SAE_KINDS", "SAEConfig", "SaescopeError", "Scope", "SparseCode", "TIERS", "TopKSAE", "export_saes",
           "load_model", "load_saes"]
__version__ = "0.1.0"
