"""Trust checks: seed stability, base-to-fine-tuned transfer. Random controls are the API's (saescope.api.controls),
since every application uses them."""

from saescope.apps.trust.run import (
    SeedsConfig,
    StabilityConfig,
    TransferConfig,
    run_seeds,
    run_stability,
    run_transfer,
)
from saescope.apps.trust.stability import THRESHOLDS, activation_match, decoder_match, format_stability, stability_report
from saescope.apps.trust.transfer import format_transfer, transfer_report

__all__ = ["THRESHOLDS", "SeedsConfig", "StabilityConfig", "TransferConfig", "activation_match", "decoder_match",
           "format_stability", "format_transfer", "run_seeds", "run_stability", "run_transfer", "stability_report",
           "transfer_report"]
