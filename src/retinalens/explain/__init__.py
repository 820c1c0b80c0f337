"""Grad-CAM heat maps for a bundle's predictions (pytorch-grad-cam is imported on first use)."""

from retinalens.explain.explainer import (
    BaseExplainer,
    Explainer,
    Explanation,
    overlay_heatmap,
    resize_heatmap,
)

__all__ = ["BaseExplainer", "Explainer", "Explanation", "overlay_heatmap", "resize_heatmap"]
