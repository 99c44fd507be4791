"""Feature coverage of datasets, coverage-driven selection from a pool, and feature-driven data synthesis."""

from saescope.apps.synthesis.coverage import Target, TargetSet, coverage, derive_targets, greedy_cover, load_targets
from saescope.apps.synthesis.generate import SynthConfig, synthesize
from saescope.apps.synthesis.run import CoverageConfig, SynthesizeConfig, run_coverage, run_synthesize

__all__ = ["CoverageConfig", "SynthConfig", "SynthesizeConfig", "Target", "TargetSet", "coverage", "derive_targets",
           "greedy_cover", "load_targets", "run_coverage", "run_synthesize", "synthesize"]
