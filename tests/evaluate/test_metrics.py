"""classification_metrics / roc_curves against hand-computed values, sklearn, and bootstrap properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from retinalens.errors import RetinaLensError
from retinalens.evaluate.metrics import _Ranked, classification_metrics, roc_curves

OCT = ["CNV", "DME", "DRUSEN", "NORMAL"]


def one_hot_probs(pred: list[int], k: int, top: float = 0.6) -> np.ndarray:
    """Probabilities whose argmax is `pred`."""
    probs = np.full((len(pred), k), (1 - top) / (k - 1))
    probs[np.arange(len(pred)), pred] = top
    return probs


def noisy_oct(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 1.0
    probs = np.exp(logits)
    return y, probs / probs.sum(axis=1, keepdims=True)


def width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_three_class_hand_computed() -> None:
    # Confusion (rows true, cols predicted): A=[3,1,0], B=[0,2,1], C=[0,1,1]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    pred = [0, 0, 0, 1, 1, 1, 2, 2, 1]
    m = classification_metrics(y, one_hot_probs(pred, 3), ["A", "B", "C"], n_boot=0)

    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert (m["n_images"], m["n_patients"]) == (9, 9)
    expected = {  # class: (precision, recall, specificity, f1, support) worked out by hand
        "A": (3 / 3, 3 / 4, 5 / 5, 6 / 7, 4),  # TP3 FP0 FN1 TN5
        "B": (2 / 4, 2 / 3, 4 / 6, 4 / 7, 3),  # TP2 FP2 FN1 TN4
        "C": (1 / 2, 1 / 2, 6 / 7, 1 / 2, 2),  # TP1 FP1 FN1 TN6
    }
    for name, (precision, recall, specificity, f1, support) in expected.items():
        c = m["per_class"][name]
        assert c["precision"] == pytest.approx(precision)
        assert c["recall"] == pytest.approx(recall)
        assert c["sensitivity"] == pytest.approx(recall)
        assert c["specificity"] == pytest.approx(specificity)
        assert c["f1"] == pytest.approx(f1)
        assert c["support"] == support
        assert c["precision_ci"] is None  # n_boot=0: no intervals
    assert m["urgent_referral"] is None


def test_binary_urgent_hand_computed() -> None:
    # Classic example: scores 0.1, 0.4 (negatives) vs 0.35, 0.8 (positives) -> AUC 3/4.
    score = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - score, score], axis=1)
    m = classification_metrics(np.array([0, 0, 1, 1]), probs, ["NORMAL", "CNV"], positive_classes=["CNV"], n_boot=50)
    urgent = m["urgent_referral"]
    assert urgent["auc"] == pytest.approx(0.75)
    assert urgent["sensitivity"] == pytest.approx(0.5)  # only 0.8 >= 0.5
    assert urgent["specificity"] == pytest.approx(1.0)
    assert (urgent["n_positive"], urgent["n_negative"]) == (2, 2)
    assert urgent["positive_classes"] == ["CNV"] and urgent["threshold"] == 0.5
    assert m["roc_auc_macro"] == pytest.approx(0.75)  # both one-vs-rest AUCs are 3/4
    lowered = classification_metrics(
        np.array([0, 0, 1, 1]), probs, ["NORMAL", "CNV"], positive_classes=["CNV"], n_boot=0, threshold=0.3
    )["urgent_referral"]
    assert (lowered["sensitivity"], lowered["specificity"]) == (1.0, 0.5)


def test_urgent_score_sums_positive_classes() -> None:
    y = np.array([0, 1, 2, 3])
    probs = np.array([[0.3, 0.3, 0.4, 0.0], [0.0, 0.3, 0.0, 0.7], [0.2, 0.2, 0.6, 0.0], [0.1, 0.0, 0.0, 0.9]])
    urgent = classification_metrics(y, probs, OCT, positive_classes=["DME", "CNV"], n_boot=0)["urgent_referral"]
    # Image 0 is CNV, argmax DRUSEN, but CNV+DME = 0.6 >= 0.5: flagged. Image 1 (DME) scores 0.3: missed.
    assert urgent["positive_classes"] == ["CNV", "DME"]
    assert urgent["sensitivity"] == pytest.approx(0.5)
    assert urgent["specificity"] == pytest.approx(1.0)


def test_perfect_predictions() -> None:
    y = np.repeat(np.arange(4), 5)
    m = classification_metrics(y, one_hot_probs(list(y), 4, top=0.97), OCT, positive_classes=["CNV", "DME"], n_boot=200)
    assert m["accuracy"] == 1.0 and m["accuracy_ci"] == [1.0, 1.0]
    assert m["roc_auc_macro"] == 1.0
    assert m["urgent_referral"]["auc"] == 1.0
    assert m["urgent_referral"]["sensitivity"] == 1.0 and m["urgent_referral"]["specificity"] == 1.0
    assert all(c["f1"] == 1.0 and c["auc"] == 1.0 for c in m["per_class"].values())


def test_auc_matches_sklearn_with_ties_and_weights() -> None:
    y, probs = noisy_oct(300, seed=3)
    probs = np.round(probs, 1)  # many tied scores
    probs /= probs.sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs, OCT, positive_classes=["CNV", "DME"], n_boot=0)
    per_class = [roc_auc_score(y == k, probs[:, k]) for k in range(4)]
    assert m["roc_auc_macro"] == pytest.approx(np.mean(per_class))
    assert [m["per_class"][c]["auc"] for c in OCT] == pytest.approx(per_class)
    assert m["urgent_referral"]["auc"] == pytest.approx(roc_auc_score(y < 2, probs[:, :2].sum(axis=1)))

    # The bootstrap kernel: weighted AUC for several weightings at once, as sklearn's sample_weight.
    patient = np.arange(300)
    weights = np.random.default_rng(99).integers(0, 3, size=(5, 300)).astype(float)
    ranked = _Ranked.of(probs[:, 0], y == 0, patient)
    expected = [roc_auc_score(y == 0, probs[:, 0], sample_weight=w) for w in weights]
    assert ranked.auc(weights) == pytest.approx(expected)


def test_macro_auc_skips_classes_without_positives() -> None:
    y = np.array([0, 0, 1, 1])  # no DRUSEN, no NORMAL
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.8, 0.05, 0.05]])
    m = classification_metrics(y, probs, OCT, n_boot=0)
    assert m["roc_auc_macro"] == pytest.approx(np.mean([roc_auc_score(y == k, probs[:, k]) for k in (0, 1)]))
    assert m["per_class"]["NORMAL"]["auc"] is None
    assert m["per_class"]["NORMAL"]["recall"] is None and m["per_class"]["NORMAL"]["precision"] is None
    assert m["per_class"]["NORMAL"]["specificity"] == 1.0
    one_class = classification_metrics(np.array([0, 0]), probs[:2], OCT, n_boot=20)
    assert one_class["roc_auc_macro"] is None and one_class["roc_auc_macro_ci"] is None


def test_ci_contains_estimate_and_narrows_with_more_patients() -> None:
    y, probs = noisy_oct(800, seed=1)
    small = classification_metrics(y[:80], probs[:80], OCT, positive_classes=["CNV", "DME"], n_boot=300)
    large = classification_metrics(y, probs, OCT, positive_classes=["CNV", "DME"], n_boot=300)
    for m in (small, large):
        for value, ci in [
            (m["accuracy"], m["accuracy_ci"]),
            (m["roc_auc_macro"], m["roc_auc_macro_ci"]),
            (m["urgent_referral"]["sensitivity"], m["urgent_referral"]["sensitivity_ci"]),
            (m["per_class"]["CNV"]["f1"], m["per_class"]["CNV"]["f1_ci"]),
        ]:
            assert ci[0] <= value <= ci[1]
    # Ten times the patients: about sqrt(10) ~ 3x narrower.
    assert width(large["accuracy_ci"]) < 0.5 * width(small["accuracy_ci"])
    assert width(large["roc_auc_macro_ci"]) < 0.5 * width(small["roc_auc_macro_ci"])


def test_clustering_duplicated_images_do_not_narrow_ci() -> None:
    y, probs = noisy_oct(60, seed=2)
    copies = 10
    y10, probs10 = np.repeat(y, copies), np.repeat(probs, copies, axis=0)
    patients10 = [f"patient{i:03d}" for i in np.repeat(np.arange(60), copies)]

    alone = classification_metrics(y, probs, OCT, n_boot=400, seed=5)
    clustered = classification_metrics(y10, probs10, OCT, groups=patients10, n_boot=400, seed=5)
    independent = classification_metrics(y10, probs10, OCT, n_boot=400, seed=5)

    assert clustered["n_patients"] == 60 and independent["n_patients"] == 600
    assert clustered["accuracy"] == alone["accuracy"] == independent["accuracy"]
    # Same patients, same draws: every resample scales all counts by 10, so the CI is unchanged.
    assert clustered["accuracy_ci"] == pytest.approx(alone["accuracy_ci"])
    assert clustered["roc_auc_macro_ci"] == pytest.approx(alone["roc_auc_macro_ci"])
    # Treating the copies as independent images would wrongly shrink it about sqrt(10)-fold.
    assert width(independent["accuracy_ci"]) < 0.5 * width(clustered["accuracy_ci"])


def test_bootstrap_matches_brute_force_resampling() -> None:
    # Reference: literally concatenate the images of the drawn patients (a patient drawn twice
    # comes twice) and recompute with sklearn. Uses the same draws: one batch of
    # rng.integers(0, n_patients, (n_boot, n_patients)) from default_rng(seed).
    y, probs = noisy_oct(90, seed=6)
    groups = np.array([f"p{i % 25:02d}" for i in range(90)])  # 25 patients, 3-4 images each
    m = classification_metrics(y, probs, OCT, groups=groups, positive_classes=["CNV", "DME"], n_boot=200, seed=11)

    patients = np.unique(groups)
    draws = np.random.default_rng(11).integers(0, len(patients), size=(200, len(patients)))
    accuracy, urgent_auc = [], []
    for draw in draws:
        idx = np.concatenate([np.flatnonzero(groups == patients[d]) for d in draw])
        accuracy.append(np.mean(probs[idx].argmax(axis=1) == y[idx]))
        urgent_auc.append(roc_auc_score(y[idx] < 2, probs[idx, :2].sum(axis=1)))
    assert m["accuracy_ci"] == pytest.approx(np.quantile(accuracy, [0.025, 0.975]).tolist())
    assert m["urgent_referral"]["auc_ci"] == pytest.approx(np.quantile(urgent_auc, [0.025, 0.975]).tolist())


def test_deterministic_given_seed() -> None:
    y, probs = noisy_oct(200, seed=4)
    groups = [f"p{i // 3}" for i in range(200)]
    kwargs = dict(groups=groups, positive_classes=["CNV", "DME"], n_boot=200)
    first = classification_metrics(y, probs, OCT, seed=7, **kwargs)
    assert classification_metrics(y, probs, OCT, seed=7, **kwargs) == first
    other = classification_metrics(y, probs, OCT, seed=8, **kwargs)
    assert other["accuracy"] == first["accuracy"] and other["accuracy_ci"] != first["accuracy_ci"]
    assert first["ci"] == {"method": "patient-clustered bootstrap (percentile)", "n_boot": 200, "level": 0.95, "seed": 7}


def test_json_round_trip_with_undefined_values() -> None:
    y = np.array([0, 0, 1, 1, 1])  # NORMAL/DRUSEN absent: undefined recall, precision, AUC
    probs = one_hot_probs([0, 1, 1, 1, 0], 4)
    m = classification_metrics(y, probs, OCT, groups=np.array(["a", "a", "b", "c", "c"]), positive_classes=["CNV", "DME"], n_boot=100)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    assert m["per_class"]["NORMAL"]["recall"] is None and m["per_class"]["NORMAL"]["recall_ci"] is None
    assert m["urgent_referral"]["specificity"] is None  # every image is urgent


@pytest.mark.parametrize(
    "change",
    [
        dict(y_true=np.array([], dtype=int), probs=np.zeros((0, 4))),
        dict(y_true=np.array([0, 1, 2])),  # 3 labels for 4 rows
        dict(probs=np.full((4, 3), 1 / 3)),  # K columns != len(classes)
        dict(probs=np.full((4, 4), 0.3)),  # rows do not sum to 1
        dict(probs=np.array([[np.nan, 0.5, 0.5, 0.0]] * 4)),
        dict(y_true=np.array([0, 1, 2, 4])),  # class index out of range
        dict(y_true=np.array([0.0, 1.0, 2.0, 3.0])),  # not integer labels
        dict(classes=["CNV", "CNV", "DRUSEN", "NORMAL"]),
        dict(groups=["a", "b"]),
        dict(groups=["a", None, "b", "c"]),
        dict(positive_classes=["GLAUCOMA"]),
        dict(n_boot=-1),
        dict(level=1.0),
    ],
)
def test_bad_input_raises(change: dict) -> None:
    kwargs = dict(y_true=np.array([0, 1, 2, 3]), probs=np.full((4, 4), 0.25), classes=OCT)
    kwargs.update(change)
    with pytest.raises(RetinaLensError):
        classification_metrics(**kwargs)


def test_roc_curves() -> None:
    y = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1, 0], [0.3, 0.6, 0.1, 0], [0.2, 0.7, 0.1, 0], [0.6, 0.3, 0.1, 0], [0.1, 0.1, 0.8, 0]])
    curves = roc_curves(y, probs, OCT, positive_classes=["CNV", "DME"])
    assert set(curves["classes"]) == {"CNV", "DME", "DRUSEN"}  # NORMAL has no positives: no curve
    for curve in [*curves["classes"].values(), curves["urgent"]]:
        assert curve["fpr"][0] == 0 and curve["tpr"][-1] == 1 and len(curve["fpr"]) == len(curve["tpr"])
    assert roc_curves(y, probs, OCT)["urgent"] is None
    with pytest.raises(RetinaLensError):
        roc_curves(y, probs[:, :3], OCT)


def test_quadratic_kappa_matches_sklearn_and_has_a_ci() -> None:
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    pred = np.clip(y + rng.integers(-1, 2, 300), 0, 4)  # mostly right, off by one grade at times
    probs = np.full((300, 5), 0.02)
    probs[np.arange(300), pred] = 0.92
    names = ["0", "1", "2", "3", "4"]
    m = classification_metrics(y, probs, names, positive_classes=["2", "3", "4"], n_boot=300, ordinal=True)
    want = cohen_kappa_score(y, pred, weights="quadratic")
    assert m["quadratic_kappa"] == pytest.approx(want, abs=1e-12)
    lo, hi = m["quadratic_kappa_ci"]
    assert lo < want < hi
    assert "quadratic_kappa" not in classification_metrics(y, probs, names, n_boot=0)
