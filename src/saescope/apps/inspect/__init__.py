"""Looking inside: inspection of texts, contrasts between text sets, the feature store's commands (its statistics,
contexts, logit lens and MoE routing live in saescope.api.store, which toxicity and synthesis read too), the report's
feature browser and the local web app."""

from saescope.apps.inspect.run import (
    BrowserConfig,
    BuildConfig,
    ExpertsConfig,
    InspectConfig,
    ServeConfig,
    ShowConfig,
    SteerConfig,
    run_browser,
    run_build,
    run_experts,
    run_inspect,
    run_serve,
    run_show,
    run_steer,
)
from saescope.apps.inspect.texts import ReadingConfig, contrast, inspect_texts

__all__ = ["BrowserConfig", "BuildConfig", "ExpertsConfig", "InspectConfig", "ReadingConfig", "ServeConfig", "ShowConfig", "SteerConfig",
           "contrast", "inspect_texts", "run_browser", "run_build", "run_experts", "run_inspect", "run_serve", "run_show", "run_steer"]
