"""The run's HTML report: training, evaluation, quality, trust and every application's section, in one page."""

from saescope.apps.report.page import build_report

__all__ = ["build_report"]
