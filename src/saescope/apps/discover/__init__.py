"""The SAE features behind a behaviour a post-training team wants less of (repetition, a language), and whether
steering them moves it beside the control: what SASFT suppresses and RL steers into."""

from saescope.apps.discover.features import (
    RankedFeature,
    SteerCheck,
    degenerate_responses,
    language_features,
    repeat_pairs,
    repetition_features,
    verify_features,
)
from saescope.apps.discover.run import DiscoverConfig, DiscoverResult, run_discover

__all__ = ["DiscoverConfig", "DiscoverResult", "RankedFeature", "SteerCheck", "degenerate_responses", "language_features",
           "repeat_pairs", "repetition_features", "run_discover", "verify_features"]
