"""`saescope coverage | synthesize` (saescope.apps.synthesis)."""

from saescope.apps.synthesis import CoverageConfig, SynthesizeConfig, run_coverage, run_synthesize
from saescope.cli.flags import Command

COMMANDS = {
    "coverage": Command(CoverageConfig, run_coverage, "the fraction of target features a dataset fires; --select: the "
                        "smallest subset of a labelled pool that keeps it, beside random subsets"),
    "synthesize": Command(SynthesizeConfig, run_synthesize, "generate examples aimed at the target features --data does "
                          "not fire; keep each only if it fires its target; the same budget unguided as the control"),
}
