"""Trust checks: seed stability, base-to-fine-tuned transfer. Random controls are core (saescope.api.controls),
since every application uses them."""

from saescope.apps.trust.stability import THRESHOLDS, activation_match, decoder_match, format_stability, stability_report
from saescope.apps.trust.transfer import finetune, format_transfer, transfer_report

__all__ = ["THRESHOLDS", "activation_match", "decoder_match", "finetune", "format_stability", "format_transfer", "stability_report",
           "transfer_report"]
