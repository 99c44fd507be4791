"""`saescope groundtruth make | score`: the ground-truth benchmark (synthetic activations from known features)."""

from saescope.apps.groundtruth import MakeConfig, ScoreConfig, run_make, run_score
from saescope.cli.flags import Command, Group

COMMANDS = {"groundtruth": Group("SAEs scored against known features: synthetic activations, recovery, MCC, absorption", {
    "make": Command(MakeConfig, run_make, "write training activations built from known features (train --activations "
                    "reads them)"),
    "score": Command(ScoreConfig, run_score, "how many true features each SAE recovers, beside a random control"),
})}
