"""`saescope redundancy footprint | report | compare | list` (saescope.apps.redundancy)."""

from saescope.apps import redundancy as app
from saescope.cli.flags import Command, Group

COMMANDS = {"redundancy": Group("benchmark redundancy from SAE feature footprints (R_hat, overlaps)", {
    "footprint": Command(app.FootprintConfig, app.run_footprint, "encode benchmark prompts and store each prompt's active "
                         "features per layer"),
    "report": Command(app.AnalysisConfig, app.run_analysis, "R_hat, coverage curves, overlap matrices, containment statements"),
    "compare": Command(app.CompareConfig, app.run_compare, "R_hat against performance-based R, overlaps against score "
                       "correlations"),
    "list": Command(app.ListConfig, app.run_list, "the built-in benchmark prompt sets"),
})}
