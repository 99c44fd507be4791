"""`saescope discover | sasft | rl`: the features behind a behaviour, and the training-time path that uses them
(saescope.apps.discover, saescope.apps.sasft, saescope.apps.rl)."""

from saescope.apps.discover import DiscoverConfig, run_discover
from saescope.apps.rl import RLConfig, run_rl
from saescope.apps.sasft import SASFTConfig, run_sasft
from saescope.cli.flags import Command

COMMANDS = {
    "discover": Command(DiscoverConfig, run_discover, "rank the SAE features of a behaviour (repetition, or a language) and "
                        "check them by steering both ways beside the control's directions"),
    "sasft": Command(SASFTConfig, run_sasft, "fine-tune (full or LoRA, TRL's SFTTrainer) with SASFT's loss: CE + lambda * "
                     "sum ReLU(pre-activation - alpha) over the unwanted features"),
    "rl": Command(RLConfig, run_rl, "GRPO with the DAPO loss (TRL's GRPOTrainer), one rollout per group steered into a "
                  "feature and given the group's lowest reward"),
}
