"""The Python API: `retinalens.load("bundle").predict("scan.jpeg")`.

Prediction runs the bundle's own backbone and head through the same decode -> preprocess ->
Backbone.encode path that built the training features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .._console import progress_bar
from ..data.images import ImageFiles, check_batching, image_batches
from ..errors import RetinaLensError
from ..models.bundle import Bundle, load_bundle
from ..models.heads import head_probabilities
from .inputs import Input, expand_inputs


class Model:
    """A loaded bundle, ready to predict. Thread-safe for concurrent `predict` calls (read-only)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.backbone = bundle.backbone
        self.head = bundle.head.eval()

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def manifest(self) -> dict[str, Any]:
        return self.bundle.manifest

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed image batch (N, 3, S, S) -> class probabilities (N, K)."""
        spatial, pooled = self.backbone.encode(batch, self.bundle.precision)
        return head_probabilities(self.head, spatial if self.bundle.head_config.input_kind == "spatial" else pooled)

    def _result(self, name: str, probs: np.ndarray) -> dict[str, Any]:
        label = self.classes[int(np.argmax(probs))]
        return {"input": name, "label": label,
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                "referral": self.bundle.referral.get(label)}

    def predict(self, source: str | Path | bytes) -> dict[str, Any]:
        """One image (path, URL or bytes) -> {input, label, probabilities, referral} or {input, error}."""
        results = self.predict_many([source])
        if len(results) != 1:
            raise RetinaLensError(f"{source} holds {len(results)} images: use predict_many")
        return results[0]

    def predict_many(self, sources: Sequence[str | Path | bytes], *, batch_size: int = 16, workers: int = 0,
                     progress: bool = False) -> list[dict[str, Any]]:
        """Many images / folders / URLs. Bad inputs get an `error` entry; the rest still complete."""
        check_batching(batch_size, workers)
        inputs = expand_inputs(list(sources))
        results: list[dict[str, Any] | None] = [{"input": i.name, "error": i.error} if i.error else None for i in inputs]
        good: list[tuple[int, Input]] = [(k, i) for k, i in enumerate(inputs) if not i.error]
        if good:
            dataset = ImageFiles([i.item for _, i in good], self.backbone.preprocessing, [i.name for _, i in good])
            order = list(range(len(good)))
            loader = image_batches(dataset, [order[i:i + batch_size] for i in range(0, len(order), batch_size)], workers)
            with progress_bar(len(good), "predict", progress) as advance:
                for x, idx, errors in loader:
                    probs = self.probabilities(x)
                    for j, (i, err) in enumerate(zip(idx.tolist(), errors)):
                        k, inp = good[i]
                        results[k] = {"input": inp.name, "error": err} if err else self._result(inp.name, probs[j])
                    advance(len(idx))
        return [r for r in results if r is not None]

    def evaluate(self, data: str | Path, **kwargs: Any) -> dict[str, Any]:
        """Metrics with CIs on a labelled dataset; see retinalens.evaluate.run.evaluate_bundle."""
        from ..evaluate.run import evaluate_bundle

        return evaluate_bundle(self.bundle, data, **kwargs)


def load(path: str | Path) -> Model:
    """Load a model bundle (verified against its manifest's hashes)."""
    return Model(load_bundle(path))
