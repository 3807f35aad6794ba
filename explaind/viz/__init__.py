"""Figures (matplotlib, Agg canvas) and the self-contained HTML report."""

from .plots import (
    balance_plot,
    kernel_matrices,
    lds_bars,
    phase_influence,
    step_group_heatmap,
    top_samples,
    training_curves,
)
from .report import ReportSection, write_report

__all__ = [
    "ReportSection",
    "balance_plot",
    "kernel_matrices",
    "lds_bars",
    "phase_influence",
    "step_group_heatmap",
    "top_samples",
    "training_curves",
    "write_report",
]
