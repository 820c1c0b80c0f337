"""Grad-CAM on real OCT scans: the public contract, faithfulness (Adebayo et al. 2018), determinism,
untouched bundles and bounded memory."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from retinalens.errors import RetinaLensError
from retinalens.explain import Explainer, Explanation
from retinalens.bundle.store import Bundle
from retinalens.models.heads import create_head
from retinalens.predict.model import Model


@pytest.fixture(scope="module")
def scans(small_dataset: Path) -> list[Path]:
    """The 16 real OCT test scans of the small dataset (4 per class, several sizes)."""
    return sorted((small_dataset / "test").glob("*/*.jpeg"))


@pytest.fixture(scope="module")
def pixels(small_bundle: Bundle, scans: list[Path]) -> torch.Tensor:
    return torch.stack([small_bundle.preprocessing.load(p) for p in scans])


def test_explain_contract(small_bundle: Bundle, scans: list[Path]) -> None:
    model = Model(small_bundle)
    with Explainer(model) as ex:
        for source in (scans[0], scans[5].read_bytes()):
            e = ex.explain(source)
            assert isinstance(e, Explanation)
            original = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            w, h = original.size
            assert e.heatmap.shape == (h, w) and e.heatmap.dtype == np.float32
            assert not np.isnan(e.heatmap).any() and e.heatmap.min() >= 0 and e.heatmap.max() <= 1
            assert e.heatmap.max() > 0.9  # min-max scaled: a real map, not all zeros
            assert e.overlay.mode == "RGB" and e.overlay.size == (w, h)
            png = Image.open(io.BytesIO(e.overlay_png()))
            assert png.format == "PNG" and png.size == (w, h)
            predicted = model.predict(source)
            assert e.label == predicted["label"] and e.class_name == e.label
            assert e.probabilities == pytest.approx(predicted["probabilities"])  # calibrated, as predict gives them

        other = next(c for c in model.classes if c != ex.explain(scans[0]).label)
        chosen = ex.explain(scans[0], target_class=other)
        assert chosen.class_name == other and chosen.label != other
        assert not np.allclose(chosen.heatmap, ex.explain(scans[0]).heatmap)  # another class, another map

        with pytest.raises(RetinaLensError, match="unknown class"):
            ex.explain(scans[0], target_class="GLAUCOMA")
        with pytest.raises(RetinaLensError):
            ex.explain(b"not an image")
        with pytest.raises(RetinaLensError):
            ex.heatmaps(torch.zeros(1, 3, 224, 224))  # float NCHW, not uint8 pixels
        with pytest.raises(RetinaLensError):
            ex.heatmaps(torch.zeros(2, 224, 224, 3, dtype=torch.uint8), [0, 9])


def test_batched_heatmaps_match_single_and_are_deterministic(small_bundle: Bundle, pixels: torch.Tensor) -> None:
    with Explainer(small_bundle) as ex:  # a Bundle is accepted as well as a Model
        maps = ex.heatmaps(pixels[:6])
        again = ex.heatmaps(pixels[:6])
        one = ex.heatmaps(pixels[2:3])
    size = small_bundle.preprocessing.size
    assert maps.shape == (6, size, size) and maps.dtype == np.float32
    assert np.array_equal(maps, again)  # same input, same map
    np.testing.assert_allclose(maps[2], one[0], atol=1e-4)  # batching does not change an image's map
    with Explainer(small_bundle) as fresh:  # nor does a fresh Explainer
        np.testing.assert_array_equal(fresh.heatmaps(pixels[:6]), maps)


def test_randomised_head_changes_the_map(small_bundle: Bundle, pixels: torch.Tensor) -> None:
    """Adebayo et al. 2018, model-parameter randomisation: a map that survives randomising the
    weights it claims to explain is an edge detector, not an explanation."""
    with Explainer(small_bundle) as ex:
        predicted = np.argmax(ex.model.probabilities(pixels), axis=1).tolist()
        trained = ex.heatmaps(pixels, predicted)
    rho = []
    for seed in range(3):  # three random heads: the check is about randomisation, not one draw
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = create_head(small_bundle.head_config, tuple(small_bundle.manifest.to_dict()["features"]["feature_shape"]),
                               len(small_bundle.classes)).eval()
        with Explainer(dataclasses.replace(small_bundle, head=head)) as ex:
            random_maps = ex.heatmaps(pixels, predicted)
        # A constant map has no rank order: it keeps nothing of the trained one (correlation 0).
        rho += [np.nan_to_num(spearmanr(a.ravel(), b.ravel()).statistic) for a, b in zip(trained, random_maps)]
    print(f"Spearman rho trained vs randomised head, {len(rho)} maps: mean {np.mean(rho):.3f}, "
          f"median {np.median(rho):.3f}, max {np.max(rho):.3f}")
    assert np.mean(rho) < 0.5
    assert all(spearmanr(a.ravel(), a.ravel()).statistic == pytest.approx(1.0) for a in trained[:2])  # the measure works


def test_target_layers(small_bundle: Bundle, small_dataset: Path, feature_cache: Path, tmp_path: Path) -> None:
    from helpers import train_small_bundle

    with Explainer(small_bundle) as ex:  # the conv head: its 1x1 conv, as in the original work
        net, layer, *_ = ex._nets[0]
        assert layer is net.head.conv
    pooled = train_small_bundle(small_dataset, tmp_path / "logreg", feature_cache, head="logreg")
    with Explainer(pooled) as ex:  # a pooled head: the backbone's last 4-D map (Lite0: conv_head + BN + ReLU6)
        net, layer, *_ = ex._nets[0]
        assert layer is net.features.bn2
        e = ex.explain(min((small_dataset / "test" / "DME").glob("*.jpeg")))
        assert e.heatmap.max() > 0.9 and not np.isnan(e.heatmap).any()


def test_bundle_is_left_untouched(small_bundle: Bundle, scans: list[Path], pixels: torch.Tensor) -> None:
    model = Model(small_bundle)
    before = model.predict(scans[3])
    grads_before = [p.requires_grad for p in small_bundle.head.parameters()]
    with torch.inference_mode(), Explainer(model) as ex:  # a caller in inference mode still gets maps
        assert ex.heatmaps(pixels[:2]).shape[0] == 2
    assert [p.requires_grad for p in small_bundle.head.parameters()] == grads_before
    assert all(p.grad is None for p in small_bundle.head.parameters())
    assert not any(p.requires_grad for p in small_bundle.backbone.model.parameters())
    for module in (*small_bundle.backbone.model.modules(), *small_bundle.head.modules()):
        assert not module._forward_hooks and not module._backward_hooks
    assert not small_bundle.head.training and not small_bundle.backbone.model.training
    assert model.predict(scans[3]) == before


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")
def test_memory_does_not_grow_over_200_calls(small_bundle: Bundle, pixels: torch.Tensor) -> None:
    one = pixels[:1]
    with Explainer(small_bundle) as ex:
        for _ in range(20):  # warm-up: allocator pools, oneDNN kernels
            ex.heatmaps(one, [0])
        start = _rss_mb()
        for i in range(200):
            ex.heatmaps(one, [i % 4])
        growth = _rss_mb() - start
        layer = ex._nets[0][1]
        assert len(layer._forward_hooks) == 1  # only the Explainer's own: each call's CAM hooks were released
    assert not layer._forward_hooks  # and that one goes with the `with`
    print(f"RSS growth over 200 heat maps after warm-up: {growth:.1f} MB")
    assert growth < 50
