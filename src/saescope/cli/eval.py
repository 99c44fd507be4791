"""`saescope eval | quality | report`: per-layer figures of a set of SAEs (beside a control), their quality, and a run's
HTML report."""

from saescope.api.evaluate import EvalConfig, run_eval
from saescope.api.quality import QualityConfig, run_quality
from saescope.apps.report import ReportConfig, run_report
from saescope.cli.flags import Command

COMMANDS = {
    "eval": Command(EvalConfig, run_eval, "FVU, L0, dead/dense fractions and CE recovered per layer"),
    "quality": Command(QualityConfig, run_quality, "SAE quality beside the control: sparse probing on real labelled text "
                       "(SAEBench), first-letter absorption, FVU on maths, code and non-English text, decoder movement"),
    "report": Command(ReportConfig, run_report, "a self-contained HTML page: training, evaluation, trust, applications"),
}
