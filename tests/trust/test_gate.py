"""The quality / out-of-distribution gate of a real OCT bundle, on real and corrupted images."""

import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageFilter

from retinalens.errors import RetinaLensError
from retinalens.trust import NO_GATE, Gate, summarize
from retinalens.trust.gate import GATE_FILE, Check, fit_gate
from retinalens.trust.statistics import ALL_STATISTICS, image_statistics
from retinalens.bundle.store import load_bundle
from retinalens.predict.model import Model

NATURAL_PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # ships with matplotlib


@pytest.fixture(scope="module")
def model(small_bundle):
    return Model(small_bundle, runtime="torch")


@pytest.fixture(scope="module")
def scans(small_dataset) -> list[Path]:
    return sorted((small_dataset / "test").glob("*/*.jpeg"))


def corrupt(src: Path, dst: Path, how: str) -> Path:
    img = np.asarray(Image.open(src).convert("L"), dtype=np.float64)
    if how == "dark":
        out = img * 0.05
    elif how == "overexposed":
        out = img * 3 + 180
    elif how == "blurred":
        out = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(8)), dtype=np.float64)
    else:
        raise ValueError(how)
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(dst)
    return dst


def test_bundle_has_a_gate_fitted_on_validation(small_bundle):
    section = small_bundle.manifest.to_dict()["gate"]
    assert section["features"]["file"] == GATE_FILE and GATE_FILE in small_bundle.manifest.to_dict()["files"]
    reasons = {c["reason"] for c in section["checks"]}
    assert {"too_dark", "overexposed", "blurred", "wrong_modality", "out_of_distribution"} <= reasons
    assert section["validation"]["rejection_rate"] <= 0.05
    gate = Gate.from_bundle(small_bundle)
    assert gate.precision.shape == (1280, 1280) and np.allclose(gate.precision, gate.precision.T, atol=1e-3)


@pytest.mark.parametrize("how", ["dark", "overexposed", "blurred"])
def test_unusable_scans_are_ungradable_with_the_reason(model, scans, tmp_path, how):
    expected = {"dark": "too_dark", "overexposed": "overexposed", "blurred": "blurred"}[how]
    paths = [corrupt(s, tmp_path / f"{how}-{s.name}", how) for s in scans[::4]]
    for r in model.predict_many(paths):
        assert r["gate"]["ok"] is False and r["gate"]["reason"] == expected, r
        assert r["label"] is None and r["referral"] is None and r["refer"] is None
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)  # still there
        assert set(r["gate"]["scores"]) == {*ALL_STATISTICS, "distance"}


def test_one_image_gets_its_statistics_beside_the_network_and_the_same_verdict(model, scans, tmp_path, monkeypatch):
    """Model.predict (one image, one intra-op thread, the other cores idle) computes the gate's file and
    image statistics on a second thread while the network runs; predict_many (whose callers, such as the
    web server, fill the cores themselves) computes them on its own thread through ImageFiles. The same
    verdicts and scores for a clean scan and for each kind of unusable one, and the same error for a
    damaged file."""
    import importlib
    import threading

    from retinalens.models.machine import usable_cores

    predict_model = importlib.import_module("retinalens.predict.model")
    where, real = [], predict_model.all_statistics

    def recorded(*a, **k):
        where.append(threading.current_thread())
        return real(*a, **k)

    monkeypatch.setattr(predict_model, "all_statistics", recorded)  # where `predict` calls it
    monkeypatch.setattr(importlib.import_module("retinalens.trust.gate"), "all_statistics", recorded)  # Gate.check
    paths = [scans[0], *(corrupt(scans[0], tmp_path / f"{how}.png", how) for how in ("dark", "overexposed", "blurred"))]
    for path in paths:
        one = model.predict(path)
        [serial] = model.predict_many([path], threads=1)
        beside, own = where[-2:]
        assert own is threading.current_thread()
        assert beside is not own if usable_cores() > 1 else beside is own
        # The same network and thread count: the features, and so every score, are the same.
        assert one == serial
    assert [model.predict(p)["gate"]["reason"] for p in paths] == [None, "too_dark", "overexposed", "blurred"]
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(scans[0].read_bytes()[:-400])
    assert "damaged image" in model.predict(cut)["error"]
    assert model.predict(cut) == model.predict_many([cut])[0]


def test_clean_scans_pass(model, scans):
    results = model.predict_many(scans)
    assert all(r["gate"]["ok"] for r in results), [r["gate"] for r in results if not r["gate"]["ok"]]
    assert all(r["label"] in model.classes and isinstance(r["refer"], bool) for r in results)


def test_most_real_oct_test_scans_pass(model, oct_root):
    scans = sorted((oct_root / "test").glob("*/*.jpeg"))[::3]  # 43 full-size scans, every class
    s = summarize([r["gate"] for r in model.predict_many(scans)])
    assert s["n_checked"] == len(scans) and s["rejection_rate"] <= 0.1, s


def test_fundus_photos_and_a_natural_photo_are_rejected(model, shared_data):
    photos = sorted((shared_data / "fundus-kaggle-dr" / "images").glob("*.jpeg"))[:12]
    photos += sorted((shared_data / "fundus-idrid" / "images").glob("*"))[:8]
    if len(photos) < 20:
        pytest.skip("fundus photos are absent from the shared data")
    results = model.predict_many([*photos, NATURAL_PHOTO])
    assert all(not r["gate"]["ok"] for r in results), [r for r in results if r["gate"]["ok"]]
    assert sum(r["gate"]["reason"] == "wrong_modality" for r in results) >= 15  # colour gives most away


def test_gate_file_is_covered_by_the_bundle_hashes(small_bundle, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(small_bundle.path, bad)
    data = bytearray((bad / GATE_FILE).read_bytes())
    data[-8:] = b"\x00" * 8  # one changed value of the precision matrix
    (bad / GATE_FILE).write_bytes(bytes(data))
    with pytest.raises(RetinaLensError, match=GATE_FILE):
        load_bundle(bad)
    (bad / GATE_FILE).unlink()
    with pytest.raises(RetinaLensError, match=GATE_FILE):
        load_bundle(bad)


def test_bundle_without_gate_grades_everything(small_bundle, scans, tmp_path):
    """A bundle from before the gate, calibration and operating point: predictions as before, gate ok."""
    old = tmp_path / "old"
    shutil.copytree(small_bundle.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("gate", "calibration"):
        del manifest[key]
    manifest["thresholds"] = {}
    del manifest["files"][GATE_FILE]
    (old / GATE_FILE).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    model = Model(load_bundle(old), runtime="torch")
    assert model.gate is None and model.temperature is None
    dark = corrupt(scans[0], tmp_path / "dark.png", "dark")
    for r in model.predict_many([scans[0], dark]):
        assert r["gate"] == NO_GATE and r["label"] in model.classes and r["refer"] is None
        assert r["p_referral"] == pytest.approx(r["probabilities"]["CNV"] + r["probabilities"]["DME"])


def test_fit_gate_needs_validation_images_and_orders_reasons():
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    stats = image_statistics(pix)
    train, val = rng.normal(size=(40, 8)), rng.normal(size=(6, 8))
    assert fit_gate({k: v[:3] for k, v in stats.items()}, train, val[:3]) is None  # too few to place thresholds
    section, files = fit_gate(stats, train, val)
    assert set(files) == {GATE_FILE} and section["checks"][-1]["score"] == "distance"
    gate = Gate([Check(**c) for c in section["checks"]])  # statistics only: no feature model
    black = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    v = gate.verdicts(image_statistics(black))[0]  # dark, blurred and more: the first check named wins
    assert v == {"ok": False, "reason": "too_dark", "scores": {k: 0.0 for k in stats}}


def test_distance_is_the_mahalanobis_distance():
    """The gate's distance (float32, on torch's threads) is sqrt(z' P z) of the float64 arithmetic."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 64))
    precision = (a @ a.T / 64 + np.eye(64)).astype(np.float32)
    mean = rng.normal(size=64).astype(np.float32)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    z = (x - mean).astype(np.float64)
    want = np.sqrt(np.einsum("ij,jk,ik->i", z, precision.astype(np.float64), z))
    got = Gate([], mean, precision).distance(x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.isnan(Gate([]).distance(x)).all()
