"""`train --resize squash+band` (the OCT default, `--resize auto`): the OCT two-view input carried in the bundle's preprocessing, so that
training, prediction, explanation and export feed the network the same 224x896 pixels (real scans, a
real bundle), and the options it cannot go with are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import retinalens
from retinalens.bundle.network import Ensemble
from retinalens.data.hashing import sha256_files
from retinalens.data.retinal_band import regions, retinal_band
from retinalens.errors import RetinaLensError
from retinalens.explain import Explainer
from retinalens.export import OnnxModel, export_bundle
from retinalens.export.formats import sidecar_path
from retinalens.export.graph import graph_temperature
from retinalens.features.extract import open_cache
from retinalens.models.heads import head_probabilities
from retinalens.trust.calibration import calibrated

SHAPE = (224, 896)


@pytest.fixture(scope="module")
def two_view_run(small_dataset, tmp_path_factory):
    """The bundle, and how many times the run discovered the data."""
    from unittest import mock

    from retinalens.train import selection

    out = tmp_path_factory.mktemp("two_view")
    with mock.patch.object(selection, "discover", side_effect=selection.discover) as discover:
        # No --resize: the default (auto) takes the two-view input for OCT scans of the four classes.
        bundle = retinalens.train(small_dataset, out / "model", head="conv", epochs=8, cv=0, cache=out / "cache")
    return bundle, discover.call_count


@pytest.fixture(scope="module")
def two_view_bundle(two_view_run):
    return two_view_run[0]


def test_the_data_are_discovered_once(two_view_run):
    """--resize auto reads the discovered classes, the split the discovered images: one walk of the data
    (a DICOM folder's headers are read in it)."""
    assert two_view_run[0].preprocessing.resize == "squash+band" and two_view_run[1] == 1


def test_the_bundle_records_the_input_and_predict_sees_the_training_pixels(two_view_bundle, small_dataset, oct_images):
    b = two_view_bundle
    assert b.preprocessing.resize == "squash+band" and b.preprocessing.shape == SHAPE
    assert json.loads((b.path / "config.json").read_text())["extract"]["resize"] == "squash+band"
    assert b.manifest.to_dict()["backbone"]["preprocessing"]["resize"] == "squash+band"
    # A network per view, reading its columns of the one shared input: the squash's 7x7 map, the band's 7x21.
    assert [(m.preprocessing.view, m.info.feature_shape) for m in b.members] == [("squash", (1280, 7, 7)),
                                                                                   ("band", (1280, 7, 21))]
    assert {m.preprocessing.shape for m in b.members} == {SHAPE}
    assert "input squash+band" in (b.path / "MODEL_CARD.md").read_text()
    model = retinalens.load(b.path)
    assert tuple(model.bundle.preprocessing.load(oct_images[0]).shape) == (*SHAPE, 3)
    # A training scan: each view's cached training features (a cache per view) give what predict gives.
    train_scan = sorted((small_dataset / "train" / "DME").glob("*.jpeg"))[0]
    each = []
    for m in b.members:
        cache = open_cache(b.path.parent / "cache", m.backbone, m.precision, spatial=True)
        assert cache.key.preprocessing["view"] == m.preprocessing.view
        each.append(calibrated(head_probabilities(m.head, cache.spatial(sha256_files([train_scan]))), m.temperature))
    want = calibrated(np.mean(each, axis=0), b.temperature)[0]
    got = model.predict(train_scan)["probabilities"]
    assert np.abs(np.array([got[c] for c in b.classes]) - want).max() < 1e-5



def test_one_scan_runs_the_squash_network_on_the_second_core_with_the_same_answer(two_view_bundle, oct_images,
                                                                                 monkeypatch):
    """`predict` of one scan (one intra-op thread, a core idle) runs the first member beside the band's
    network, on the gate's thread; predict_many on one thread runs them in turn: the same answer."""
    import threading

    from retinalens.models.machine import usable_cores

    model = retinalens.load(two_view_bundle.path, runtime="torch")
    where: dict[str, list[threading.Thread]] = {}
    for m in model.bundle.members:
        real = m.backbone.encode

        def recorded(*a, real=real, view=m.preprocessing.view, **k):
            where.setdefault(view, []).append(threading.current_thread())
            return real(*a, **k)

        monkeypatch.setattr(m.backbone, "encode", recorded)
    for scan in oct_images[:3]:
        where.clear()
        one = model.predict(scan)
        assert where["band"] == [threading.current_thread()]
        assert (where["squash"][0] is not threading.current_thread()) == (usable_cores() > 1)
        [serial] = model.predict_many([scan], threads=1)
        assert where["squash"][1] is threading.current_thread()
        assert one == serial and one["gate"]["ok"]

def test_heat_maps_come_back_on_the_scan_and_cover_only_what_the_views_show(two_view_bundle, oct_images):
    with Explainer(two_view_bundle) as ex:
        scan = oct_images[0]
        e = ex.explain(scan)
        img = e.image
        assert e.heatmap.shape == (img.height, img.width) and 0.0 <= e.heatmap.min() <= e.heatmap.max() <= 1.0
        pixels = two_view_bundle.preprocessing.load(scan)[None]
        raw = ex.heatmaps(pixels, [two_view_bundle.classes.index(e.class_name)])[0]
        assert raw.shape == SHAPE
        # Zero the squash's part: what is left lies inside the band the tiles were cut from.
        raw[:, :224] = 0.0
        from retinalens.data.decode import decode_image

        decoded = decode_image(scan, keep_grey=True)
        placed = two_view_bundle.preprocessing.place_heatmap(raw, decoded)
        top, bottom = regions(decoded.width, decoded.height, retinal_band(decoded), 224)[1].image_box[1::2]
        rows = np.nonzero(placed.max(axis=1) > 0)[0]
        assert rows.size and rows.min() >= int(top) and rows.max() <= int(bottom)


def test_onnx_export_takes_the_two_view_pixels_and_matches_the_eager_ensemble(two_view_bundle, oct_images, tmp_path):
    b = two_view_bundle
    path = export_bundle(b, "onnx", tmp_path / "model.onnx")
    ort = OnnxModel(path)
    assert ort.metadata["input"]["shape"] == ["N", *SHAPE, 3] and "retinal band" in ort.metadata["input"]["meaning"]
    pixels = torch.stack([b.preprocessing.load(p) for p in oct_images])
    p, pooled = ort.run(pixels)
    with torch.inference_mode():
        p_ref, pooled_ref = Ensemble.from_bundle(b, temperature=graph_temperature(b)).eval()(pixels)
    assert p.shape == p_ref.shape and np.abs(p - p_ref.numpy()).max() < 1e-4
    assert np.abs(pooled - pooled_ref.numpy()).max() < 1e-4
    # the eager ensemble is its two views' networks averaged: dropping either changes the answer
    with torch.inference_mode():
        alone = [Ensemble([n], [t], ("identity",), graph_temperature(b))(pixels)[0].numpy()
                 for n, t in zip(Ensemble.from_bundle(b).members, [m.temperature or 1.0 for m in b.members])]
    assert min(np.abs(p - a).max() for a in alone) > 1e-3
    with pytest.raises(ValueError, match="224, 896, 3"):
        ort.run(pixels[:, :, :224])


def test_litert_export_is_one_graph_of_both_views_that_matches_the_eager_ensemble(two_view_bundle, oct_images,
                                                                                   tmp_path):
    """The phone format of the OCT default: one .tflite graph with the 224x896 uint8 input, both views'
    networks and their average inside, within 1e-4 of the eager fp32 ensemble on real scans."""
    pytest.importorskip("litert_torch", reason="LiteRT export needs the 'tflite' extra")
    pytest.importorskip("ai_edge_litert", reason="the LiteRT runtime needs the 'tflite' extra")
    from retinalens.export.litert import LiteRTModel

    b = two_view_bundle
    path = export_bundle(b, "tflite", tmp_path / "model.tflite")
    pixels = torch.stack([b.preprocessing.load(p) for p in oct_images])
    p, pooled = LiteRTModel(path).run(pixels.numpy())
    with torch.inference_mode():
        p_ref, pooled_ref = Ensemble.from_bundle(b, temperature=graph_temperature(b)).eval()(pixels)
    assert p.shape == p_ref.shape and (p.argmax(1) == p_ref.numpy().argmax(1)).all()
    assert np.abs(p - p_ref.numpy()).max() < 1e-4
    assert np.abs(pooled - pooled_ref.numpy()).max() < 1e-3 * np.abs(pooled_ref.numpy()).max()
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["input"]["shape"] == [1, *SHAPE, 3] and len(meta["ensemble"]["members"]) == 2


def test_evaluate_scores_the_test_split_through_both_views(two_view_bundle, small_dataset):
    m = retinalens.evaluate(two_view_bundle.path, small_dataset, n_boot=50)
    assert m["n_images"] == 16 and 0.0 <= m["accuracy"] <= 1.0
    assert m["model"]["members"] == ["efficientnet_lite0 view squash", "efficientnet_lite0 view band"]
    card = (two_view_bundle.path / "MODEL_CARD.md").read_text()
    assert "seed 0 view squash" in card and "seed 0 view band" in card


def test_the_band_network_judges_near_duplicates_on_the_whole_scans_features(two_view_bundle, small_dataset, tmp_path):
    """The near-duplicate rule's thresholds were measured on whole-scan features: the band view's network
    takes its near-duplicates from the squash view's cache (on band features, scans of two patients and
    two classes met the rule)."""
    from dataclasses import replace
    from unittest import mock

    from retinalens.train import pipeline

    cfg = pipeline.build_run_config(small_dataset, resize="squash+band", head="conv", epochs=2, cv=0,
                                    cache=two_view_bundle.path.parent / "cache")
    cfg = replace(cfg, extract=replace(cfg.extract, view="band"))
    seen = []

    def spy(data, cache, cross_validated):
        seen.append(cache.key.preprocessing.get("view"))
        return drop(data, cache, cross_validated)

    drop = pipeline.drop_near_duplicates
    with mock.patch.object(pipeline, "drop_near_duplicates", spy):
        bundle = pipeline.train_bundle(cfg, tmp_path / "band", progress=False)
    assert seen == ["squash"] and bundle.preprocessing.view == "band"


@pytest.mark.parametrize("options, match", [
    ({"mode": "finetune"}, "bottleneck members only"),
    ({"tta": "flip"}, "takes no --tta"),
    ({"ensemble": "efficientnet_lite0,efficientnet_lite0:finetune"}, "bottleneck members only"),
    ({"task": "referable"}, "for OCT B-scans"),
])
def test_what_the_two_view_input_cannot_go_with_is_refused_before_any_work(small_dataset, tmp_path, options, match):
    with pytest.raises(RetinaLensError, match=match):
        retinalens.train(small_dataset, tmp_path / "model", resize="squash+band", **options)
    assert not (tmp_path / "model").exists()


def test_an_unknown_resize_is_one_clear_error(small_dataset, tmp_path):
    with pytest.raises(RetinaLensError, match="--resize must be one of squash, squash"):
        retinalens.train(small_dataset, tmp_path / "model", resize="letterbox")
