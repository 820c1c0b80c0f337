"""Fixtures of the export tests: real OCT scans as the model's uint8 input, and the fp32 eager reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def pixels(small_bundle, oct_images) -> torch.Tensor:
    """The 8 real OCT scans (2 per class) as Preprocessing.load gives them: uint8 (8, S, S, 3)."""
    return torch.stack([small_bundle.preprocessing.load(p) for p in oct_images])


@pytest.fixture(scope="session")
def eager_fp32() -> Callable:
    """bundle, pixels -> (probabilities, pooled): the bundle's head on backbone.model.forward_features,
    fp32 eager (no trace, no bf16), temperature applied the way evaluation applies it. Every export
    must match this within 1e-4."""
    from retinalens.evaluate.calibration import bundle_temperature, calibrated

    def reference(bundle, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        bb = bundle.backbone
        with torch.inference_mode():
            maps = bb.model.forward_features(bb.preprocessing.normalize(x))
            pooled = maps.mean(dim=(2, 3))
            logits = bundle.head.eval()(maps.permute(0, 2, 3, 1) if bundle.head_config.input_kind == "spatial" else pooled)
        return calibrated(torch.softmax(logits, dim=1).numpy(), bundle_temperature(bundle.manifest)), pooled.numpy()

    return reference
