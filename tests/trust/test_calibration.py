"""Temperature scaling, ECE / reliability and the referral operating point: by hand, and in a real bundle."""

import json
import shutil

import numpy as np
import pytest
import torch

from retinalens.errors import RetinaLensError
from retinalens.trust.calibration import (
    calibrated,
    expected_calibration_error,
    fit_temperature,
    nll,
    positive_score,
    referral_threshold,
    reliability,
)
from retinalens.evaluate.run import evaluate_bundle
from retinalens.bundle.store import load_bundle
from retinalens.models.heads import head_probabilities
from retinalens.predict.model import Model


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n: int = 4000, k: int = 4, sharpen: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z); the model reports softmax(3 z): right ranking, over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    y = np.array([rng.choice(k, p=p) for p in softmax(z)])
    return softmax(sharpen * z), y


def test_temperature_fit_undoes_overconfidence_and_lowers_nll():
    probs, y = overconfident()
    t = fit_temperature(probs, y)
    assert t == pytest.approx(3.0, rel=0.1)  # the sharpening the data were given
    after = calibrated(probs, t)
    assert nll(after, y) < nll(probs, y) - 0.1
    assert expected_calibration_error(after, y) < expected_calibration_error(probs, y) / 2
    assert (after.argmax(1) == probs.argmax(1)).all()  # accuracy untouched
    assert np.allclose(after.sum(1), 1)


def test_calibrated_identity_and_zero_probabilities():
    p = np.array([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]])
    assert calibrated(p, None) is not None and np.array_equal(calibrated(p, None), p)
    assert np.array_equal(calibrated(p, 1.0), p)
    hot = calibrated(p, 2.0)
    assert np.isfinite(hot).all() and np.allclose(hot.sum(1), 1)
    assert hot[0, 0] == pytest.approx(np.sqrt(0.7) / (np.sqrt(0.7) + np.sqrt(0.3)))  # softmax(log p / 2)


def test_ece_and_reliability_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right): bins (13/15, 14/15] and (8/15, 9/15].
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    r = reliability(probs, y)
    assert len(r["count"]) == 15 and sum(r["count"]) == 4
    assert r["count"][13] == 2 and r["count"][8] == 2
    assert r["confidence"][13] == pytest.approx(0.9) and r["accuracy"][13] == pytest.approx(0.5)
    assert r["accuracy"][8] == 1.0 and r["confidence"][0] is None
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.4
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


def test_referral_threshold_reaches_target_sensitivity():
    rng = np.random.default_rng(1)
    positive = rng.random(500) < 0.3
    score = np.clip(rng.normal(np.where(positive, 0.7, 0.3), 0.2), 0, 1)
    for target in (0.8, 0.9, 0.95, 1.0):
        r = referral_threshold(score, positive, target)
        sens = (score[positive] >= r["threshold"]).mean()
        assert sens >= target and r["val_sensitivity"] == pytest.approx(sens)
        # the highest such threshold: any higher one misses the target
        assert (score[positive] > r["threshold"]).mean() < target
        assert r["val_specificity"] == pytest.approx((score[~positive] < r["threshold"]).mean())
    with pytest.raises(RetinaLensError, match="no positive"):
        referral_threshold(score, np.zeros(500, dtype=bool))
    with pytest.raises(RetinaLensError, match="target sensitivity"):
        referral_threshold(score, positive, 1.5)


def test_bundle_stores_temperature_and_operating_point(small_bundle):
    m = small_bundle.manifest.to_dict()
    t = m["calibration"]["temperature"]
    assert 0.05 <= t <= 20 and m["calibration"]["nll_after"] <= m["calibration"]["nll_before"] + 1e-9
    ref = m["thresholds"]["referral"]
    assert ref["positive_classes"] == ["CNV", "DME"] and ref["target_sensitivity"] == 0.95
    assert ref["val_sensitivity"] >= 0.95 and 0 <= ref["threshold"] <= 1
    assert Model(small_bundle, runtime="torch").temperature == t


def test_temperature_round_trips_and_model_probabilities_apply_it(small_bundle, small_dataset, tmp_path):
    bundle_dir = tmp_path / "b"
    shutil.copytree(small_bundle.path, bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["calibration"]["temperature"] = 2.5  # far from 1, so applying it or not is visible
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    model = Model(load_bundle(bundle_dir), runtime="torch")
    assert model.temperature == 2.5
    pp = small_bundle.preprocessing
    files = sorted((small_dataset / "test").glob("*/*.jpeg"))[:4]
    batch = torch.stack([pp.load(f) for f in files])
    spatial, pooled = model.backbone.encode(batch, small_bundle.precision)
    raw = head_probabilities(model.head, spatial if small_bundle.head_config.input_kind == "spatial" else pooled)
    assert np.allclose(model.probabilities(batch), calibrated(raw, 2.5), atol=1e-9)
    assert not np.allclose(model.probabilities(batch), raw, atol=1e-3)
    r = model.predict(files[0])
    p = np.array([r["probabilities"][c] for c in model.classes])
    assert r["p_referral"] == pytest.approx(positive_score(p[None], model.classes, ["CNV", "DME"])[0])
    assert r["gate"]["ok"] and r["refer"] == (r["p_referral"] >= manifest["thresholds"]["referral"]["threshold"])


def test_evaluate_reports_calibration_operating_point_and_gate(small_bundle, small_dataset, feature_cache):
    m = evaluate_bundle(small_bundle, small_dataset, cache=feature_cache, n_boot=100, progress=False)
    c = m["calibration"]
    assert c["temperature"] == small_bundle.manifest.to_dict()["calibration"]["temperature"]
    for key in ("reliability_before", "reliability_after"):
        assert set(c[key]) == {"confidence", "accuracy", "count"} and len(c[key]["count"]) == 15
        assert sum(c[key]["count"]) == m["n_images"]
    assert 0 <= c["ece_before"] <= 1 and 0 <= c["ece_after"] <= 1
    op = m["operating_point"]
    assert {"threshold", "target_sensitivity", "positive_classes", "sensitivity", "sensitivity_ci", "specificity",
            "specificity_ci"} <= set(op)
    assert op["threshold"] == small_bundle.manifest.to_dict()["thresholds"]["referral"]["threshold"]
    assert op["sensitivity_ci"] is None or op["sensitivity_ci"][0] <= op["sensitivity"] <= op["sensitivity_ci"][1]
    # The same decision as prediction makes from pixels (p_referral against the stored threshold).
    preds = Model(small_bundle, runtime="torch").predict_many([small_dataset / "test"])
    urgent = [p["input"].split("/")[-2] in ("CNV", "DME") for p in preds]
    flagged = [p["p_referral"] >= op["threshold"] for p in preds]
    assert op["sensitivity"] == pytest.approx(np.mean([f for f, u in zip(flagged, urgent) if u]))
    assert op["specificity"] == pytest.approx(np.mean([not f for f, u in zip(flagged, urgent) if not u]))
    g = m["gate"]
    assert g["n_checked"] == m["n_images"] and g["n_rejected"] == sum(g["reasons"].values())
    assert g["rejection_rate"] == g["n_rejected"] / g["n_checked"]
