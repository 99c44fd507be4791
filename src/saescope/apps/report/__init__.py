"""The run's HTML report: training, evaluation, quality, trust and every application's section, in one page."""

from saescope.apps.report.page import ReportConfig, ReportResult, build_report, run_report

__all__ = ["ReportConfig", "ReportResult", "build_report", "run_report"]
