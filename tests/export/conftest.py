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
    """bundle, pixels -> (probabilities, pooled): the bundle's one Network (bundle/network.py), fp32
    eager (no trace, no bf16), temperature applied the way evaluation applies it. Every export
    must match this within 1e-4."""
    from retinalens.trust.calibration import calibrated

    def reference(bundle, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from retinalens.bundle.network import Network

        with torch.inference_mode():
            logits, pooled = Network.from_bundle(bundle).eval()(x)
        return calibrated(torch.softmax(logits, dim=1).numpy(), bundle.temperature), pooled.numpy()

    return reference
