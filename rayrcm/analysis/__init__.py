"""Certified accuracy, ACR, tables and plots from certification rows, and any results side by side
(pandas/matplotlib; no Ray)."""

from rayrcm.analysis.certified import (
    abstention_rate,
    average_certified_radius,
    certified_accuracy,
    default_radii,
    plot_curves,
    summary_metrics,
    summary_table,
    to_latex,
    to_markdown,
    total_samples,
)
from rayrcm.analysis.compare import compare_tables, read_result
from rayrcm.analysis.per_class import (
    per_class_markdown,
    per_class_metrics,
    per_class_table,
    worst_class,
)
from rayrcm.analysis.report import result_labels, write_analysis
from rayrcm.analysis.results import read_results, write_cohen_tsv

__all__ = [
    "abstention_rate", "average_certified_radius", "certified_accuracy", "compare_tables",
    "default_radii", "per_class_markdown", "per_class_metrics", "per_class_table", "plot_curves", "read_result", "read_results", "result_labels", "summary_metrics", "summary_table",
    "to_latex", "to_markdown", "total_samples", "worst_class", "write_analysis", "write_cohen_tsv",
]
