"""Inspect stage: reports of what the pass found and did."""
from .report import Report, backward_depth, format_report

__all__ = ["Report", "backward_depth", "format_report"]
