"""SASFT: fine-tuning with an auxiliary loss that keeps chosen SAE features from firing (Qwen-Scope report section 7)."""

from saescope.apps.sasft.loss import FeatureSuppression, StepStats, estimate_alpha
from saescope.apps.sasft.train import SASFTConfig, SASFTResult, run_sasft, sasft_trainer

__all__ = ["FeatureSuppression", "SASFTConfig", "SASFTResult", "StepStats", "estimate_alpha", "run_sasft", "sasft_trainer"]
