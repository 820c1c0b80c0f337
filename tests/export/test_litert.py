"""LiteRT (TensorFlow Lite) export: parity with the eager network on real scans (a single network, and a
2-member ensemble as one graph), the quantised variants' size and agreement, and clear errors where the
converter is missing or the option does not apply."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from retinalens.errors import RetinaLensError
from retinalens.export import export_bundle
from retinalens.export.formats import sidecar_path
from retinalens.export.litert import QUANTIZATIONS
from retinalens.trust.calibration import calibrated

from helpers import cli_command, cli_env


@pytest.fixture(scope="module")
def litert_exports(small_bundle, tmp_path_factory):
    """The small bundle as a .tflite file per --quantize variant (converted once: each takes a minute)."""
    pytest.importorskip("litert_torch", reason="LiteRT export needs the 'tflite' extra")
    pytest.importorskip("ai_edge_litert", reason="the LiteRT runtime needs the 'tflite' extra")
    folder = tmp_path_factory.mktemp("litert")
    return {q: export_bundle(small_bundle, "tflite", folder / f"model-{q}.tflite", quantize=q) for q in QUANTIZATIONS}


def test_litert_matches_the_eager_network_on_real_scans(litert_exports, small_bundle, pixels, eager_fp32):
    from retinalens.export.litert import LiteRTModel

    want_p, want_f = eager_fp32(small_bundle, pixels)
    got_p, got_f = LiteRTModel(litert_exports["none"]).run(pixels.numpy())
    assert got_p.shape == want_p.shape and got_f.shape == want_f.shape
    assert (got_p.argmax(1) == want_p.argmax(1)).all()  # the same class for every scan
    assert np.abs(got_p - want_p).max() < 1e-4  # the same probabilities, to float32 rounding
    assert np.allclose(got_p.sum(1), 1, atol=1e-5)


def test_a_two_member_ensemble_is_one_litert_graph_that_averages_its_members(small_dataset, feature_cache,
                                                                              oct_images, tmp_path):
    """Two seeds of the default network in one bundle: the .tflite file against each member's own fp32
    eager network (bundle/network.py), softmax(logits / T_m) averaged, then the bundle's temperature."""
    pytest.importorskip("litert_torch", reason="LiteRT export needs the 'tflite' extra")
    pytest.importorskip("ai_edge_litert", reason="the LiteRT runtime needs the 'tflite' extra")
    import retinalens
    from retinalens.bundle.network import Network
    from retinalens.export.litert import LiteRTModel

    # --resize squash: one network per seed (the OCT default, two views, is a network per view:
    # tests/export/test_two_view.py exports it)
    ens = retinalens.train(small_dataset, tmp_path / "ens", seeds="0,1", head="conv", epochs=6, cv=0, workers=0,
                           cache=str(feature_cache), resize="squash")
    assert len(ens.members) == 2
    x = torch.stack([ens.preprocessing.load(p) for p in oct_images])
    members, first_pooled = [], None
    with torch.inference_mode():
        for m in ens.members:
            logits, pooled = Network.from_member(m, private=True)(x)
            first_pooled = pooled.numpy() if first_pooled is None else first_pooled
            members.append(calibrated(torch.softmax(logits.float(), dim=1).numpy(), m.temperature))
    want = calibrated(np.mean(members, axis=0), ens.temperature)
    path = export_bundle(ens, "tflite", tmp_path / "ens.tflite")
    got, pooled = LiteRTModel(path).run(x.numpy())
    assert (got.argmax(1) == want.argmax(1)).all() and np.abs(got - want).max() < 1e-4
    assert np.abs(pooled - first_pooled).max() < 1e-3 * np.abs(first_pooled).max()  # the first member's features
    assert len(json.loads(sidecar_path(path).read_text())["ensemble"]["members"]) == 2


def test_int8_is_smaller_and_runs(litert_exports, small_bundle, pixels):
    from retinalens.export.litert import LiteRTModel

    fp32, int8 = (litert_exports[q] for q in ("none", "int8"))
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size  # int8 weights: about 3.5x smaller
    got, _ = LiteRTModel(int8).run(pixels.numpy())
    # Its accuracy is measured, not asserted here (README, Export: dynamic-range int8 loses much of it on this
    # model); what must hold is that it runs and gives probability distributions.
    assert got.shape == (len(pixels), len(small_bundle.classes)) and np.allclose(got.sum(1), 1, atol=1e-4)
    side = json.loads(sidecar_path(int8).read_text())
    assert side["format"] == "tflite" and side["quantization"] == "int8" and side["input"]["shape"][0] == 1
    assert side["classes"] == small_bundle.classes and side["temperature"] == pytest.approx(small_bundle.temperature)


@pytest.mark.parametrize("quantize, smaller, agree", [("int8-weights", 0.45, 0.8), ("fp16", 0.6, 1.0)])
def test_weight_quantised_variants_keep_the_answers(litert_exports, small_bundle, pixels, quantize, smaller, agree):
    """Weight-only variants store smaller weights but compute in float32. On real scans fp16 must give the
    fp32 export's class for every scan; int8 convolution weights for most (on the 129 test scans of the
    default bundle: 124 the same as torch, see the bench). Dynamic int8, above, keeps about half."""
    from retinalens.export.litert import LiteRTModel

    fp32, variant = (litert_exports[q] for q in ("none", quantize))
    assert variant.stat().st_size < smaller * fp32.stat().st_size
    want, _ = LiteRTModel(fp32).run(pixels.numpy())
    got, _ = LiteRTModel(variant).run(pixels.numpy())
    assert (got.argmax(1) == want.argmax(1)).mean() >= agree
    if quantize == "fp16":
        assert np.abs(got - want).max() < 0.02  # float16 rounding of the weights only
    assert json.loads(sidecar_path(variant).read_text())["quantization"] == quantize


def test_quantize_is_litert_only(small_bundle, tmp_path):
    with pytest.raises(RetinaLensError, match="LiteRT only"):
        export_bundle(small_bundle, "onnx", tmp_path / "m.onnx", quantize="int8")
    with pytest.raises(RetinaLensError, match="--quantize"):
        export_bundle(small_bundle, "tflite", tmp_path / "m.tflite", quantize="int4")


def test_missing_converter_names_the_extra(small_bundle, tmp_path):
    """Without litert-torch, one line naming the extra. Simulated, so that it runs whether or not the
    extra is installed: a module of its name that fails to import, first on the child's path."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "litert_torch.py").write_text('raise ImportError("No module named litert_torch (simulated)")\n')
    env = cli_env()
    env["PYTHONPATH"] = f"{blocker}{os.pathsep}{env['PYTHONPATH']}"
    r = subprocess.run(cli_command("export", small_bundle.path, "--format", "tflite", "--out", tmp_path / "m.tflite"),
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 2 and "retinalens[tflite]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.tflite").exists()
