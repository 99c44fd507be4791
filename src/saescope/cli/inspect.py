"""`saescope inspect | features | steer | serve` (saescope.apps.inspect)."""

from saescope.apps import inspect as app
from saescope.cli.flags import Command, Group

COMMANDS = {
    "inspect": Command(app.InspectConfig, app.run_inspect, "top features per text and layer; with --baseline, features that "
                       "fire more on one set"),
    "features": Group("the feature store: per-feature statistics, top contexts, logit lens", {
        "build": Command(app.BuildConfig, app.run_build, "one pass over a corpus recording every feature's statistics and top "
                         "contexts"),
        "show": Command(app.ShowConfig, app.run_show, "one feature: frequency, activation histogram, top contexts, logit lens, "
                        "experts"),
        "experts": Command(app.ExpertsConfig, app.run_experts, "MoE stores: per expert, the features most associated with it"),
        "browser": Command(app.BrowserConfig, app.run_browser, "(re)write the report's feature browser section from a store"),
    }),
    "steer": Command(app.SteerConfig, app.run_steer, "generate with strength x decoder direction added at a layer, beside the "
                     "unsteered output"),
    "serve": Command(app.ServeConfig, app.run_serve, "local web app: per-token features, feature cards, steering"),
}
