"""SASFT: fine-tuning with an auxiliary loss that keeps chosen SAE features from firing (Qwen-Scope report section 7)."""

from saescope.sasft.data import Pair, heldout_prompts, load_pairs
from saescope.sasft.loss import FeatureSuppression, StepStats, estimate_alpha
from saescope.sasft.train import JsonlLog, SASFTConfig, run_sasft, sasft_trainer

__all__ = ["FeatureSuppression", "JsonlLog", "Pair", "SASFTConfig", "StepStats", "estimate_alpha", "heldout_prompts",
           "load_pairs", "run_sasft", "sasft_trainer"]
