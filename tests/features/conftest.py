"""Fixtures of the feature-cache tests: N real scans and an uninterrupted reference extraction of them."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from retinalens.data.hashing import sha256_files
from retinalens.features.extract import open_cache

from helpers import N, extract_into


@pytest.fixture(scope="module")
def images(oct_pool: list[Path]) -> list[Path]:
    return oct_pool[:N]


@pytest.fixture(scope="module")
def hashes(images: list[Path]) -> list[str]:
    return sha256_files(images)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, backbone, images):
    """An uninterrupted extraction of the N images (read-only for the tests: copy it to change it)."""
    root = tmp_path_factory.mktemp("reference-cache")
    cache = open_cache(root, backbone, "fp32")
    report = extract_into(images, backbone, cache)
    return types.SimpleNamespace(root=root, cache=cache, report=report)


@pytest.fixture(scope="module")
def expected(backbone, images, hashes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """encode() on the batches extraction uses: sorted unique hashes, cut into batches of 4."""
    by_hash = dict(zip(hashes, images))
    order = sorted(by_hash)
    out = {}
    for i in range(0, len(order), 4):
        keys = order[i:i + 4]
        x = torch.stack([backbone.preprocessing.load(by_hash[k]) for k in keys])
        s, p = backbone.encode(x, "fp32")
        for j, k in enumerate(keys):
            out[k] = (s[j].numpy(), p[j].numpy())
    return out
