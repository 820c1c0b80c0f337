"""`train --input-size`: a backbone input other than its own size, carried in the bundle's preprocessing,
so that training, prediction and export feed the network the same pixels (real scans, a real bundle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import retinalens
from retinalens.data.hashing import sha256_files
from retinalens.export import OnnxModel, export_bundle
from retinalens.features.extract import open_cache
from retinalens.models.heads import head_probabilities
from retinalens.trust.calibration import calibrated

SIZE = 288  # neither Lite0's own 224 nor the fundus default


@pytest.fixture(scope="module")
def sized_bundle(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sized")
    # one network on the squash, at SIZE (the two-view input at a size: tests/export/test_two_view.py's input)
    return retinalens.train(small_dataset, out / "model", input_size=SIZE, head="logreg", cv=0, cache=out / "cache",
                            resize="squash")


def test_the_bundle_records_the_size_and_predict_sees_the_training_pixels(sized_bundle, small_dataset, oct_images):
    b = sized_bundle
    assert b.preprocessing.size == SIZE
    assert json.loads((b.path / "config.json").read_text())["extract"]["input_size"] == SIZE
    assert b.manifest.to_dict()["backbone"]["preprocessing"]["size"] == SIZE
    model = retinalens.load(b.path)
    assert model.bundle.preprocessing.load(oct_images[0]).shape == (SIZE, SIZE, 3)
    # A training scan: its cached training features (the size's own cache) give what predict gives.
    train_scan = sorted((small_dataset / "train" / "CNV").glob("*.jpeg"))[0]
    cache = open_cache(b.path.parent / "cache", model.bundle.backbone, b.precision, spatial=False)
    assert cache.key.preprocessing["size"] == SIZE
    pooled = cache.pooled(sha256_files([train_scan]))
    want = calibrated(head_probabilities(b.head, pooled), b.temperature)[0]
    got = model.predict(train_scan)["probabilities"]
    assert np.abs(np.array([got[c] for c in b.classes]) - want).max() < 1e-5


def test_onnx_export_at_that_size_matches_the_eager_network(sized_bundle, oct_images, eager_fp32, tmp_path):
    b = sized_bundle
    path = export_bundle(b, "onnx", tmp_path / "model.onnx")
    ort = OnnxModel(path)
    assert ort.metadata["preprocessing"]["size"] == SIZE
    pixels = torch.stack([b.preprocessing.load(p) for p in oct_images])
    p, pooled = ort.run(pixels)
    p_ref, pooled_ref = eager_fp32(b, pixels)
    assert p.shape == p_ref.shape and np.abs(p - p_ref).max() < 1e-4
    assert np.abs(pooled - pooled_ref).max() < 1e-3 * np.abs(pooled_ref).max()
    with pytest.raises(ValueError, match=f"{SIZE}, {SIZE}, 3"):  # the bundle's size, not the backbone's own
        ort.run(pixels[:, :224, :224])
