"""SASFT: fine-tuning with an auxiliary loss that keeps chosen SAE features from firing (Qwen-Scope report section 7)."""

from saescope.apps.sasft.data import Pair, heldout_prompts, load_pairs
from saescope.apps.sasft.loss import FeatureSuppression, StepStats, estimate_alpha
from saescope.apps.sasft.train import SASFTConfig, run_sasft, sasft_trainer

__all__ = ["FeatureSuppression", "JsonlLog", "Pair", "SASFTConfig", "StepStats", "estimate_alpha", "heldout_prompts",
           "load_pairs", "run_sasft", "sasft_trainer"]


def __getattr__(name: str):
    if name == "JsonlLog":  # built on first use (saescope.api.finetune): its base class imports transformers' trainer
        from saescope.api import finetune

        return finetune.JsonlLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
