"""`saescope control | stability | transfer`: random controls, seed stability between two SAE sets, and transfer of
SAEs to another checkpoint."""

from saescope.api.controls import ControlConfig, run_control
from saescope.apps.trust import StabilityConfig, TransferConfig, run_stability, run_transfer
from saescope.cli.flags import Command

COMMANDS = {
    "control": Command(ControlConfig, run_control, "make a control SAE set shaped like trained SAEs: random directions, "
                       "or the run trained again with its decoder frozen or held near its init"),
    "stability": Command(StabilityConfig, run_stability, "match the features of two SAE sets of the same layers (seeds, "
                         "data order)"),
    "transfer": Command(TransferConfig, run_transfer, "apply SAEs to another checkpoint and compare the fit with their own "
                        "model's"),
}
