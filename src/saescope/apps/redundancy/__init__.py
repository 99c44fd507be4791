"""Benchmark redundancy from SAE features (Qwen-Scope report, section 4): footprints of benchmark prompts,
coverage curves and R_hat(D), asymmetric overlaps, and the performance-based R(D) they are checked against."""

from saescope.apps.redundancy.run import (
    AnalysisConfig,
    CompareConfig,
    FootprintConfig,
    ListConfig,
    run_analysis,
    run_compare,
    run_footprint,
    run_list,
)

__all__ = ["AnalysisConfig", "CompareConfig", "FootprintConfig", "ListConfig", "run_analysis", "run_compare",
           "run_footprint", "run_list"]
