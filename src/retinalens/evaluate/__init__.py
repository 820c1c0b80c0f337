"""Evaluation: metrics with patient-clustered bootstrap CIs, and a self-contained HTML report."""

from retinalens.evaluate.metrics import classification_metrics, roc_curves
from retinalens.evaluate.plots import plot_training_curves
from retinalens.evaluate.report import write_html_report

__all__ = ["classification_metrics", "plot_training_curves", "roc_curves", "write_html_report"]
