"""Feature coverage of datasets, coverage-driven selection from a pool, and feature-driven data synthesis."""

from saescope.apps.synthesis.coverage import Target, TargetSet, coverage, derive_targets, greedy_cover, load_targets
from saescope.apps.synthesis.generate import SynthConfig, synthesize

__all__ = ["SynthConfig", "Target", "TargetSet", "coverage", "derive_targets", "greedy_cover", "load_targets", "synthesize"]
