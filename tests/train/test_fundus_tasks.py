"""DR tasks end to end on the real Kaggle fundus sample (kept outside the repository; skipped if absent)."""

import pytest

import retinalens


@pytest.fixture(scope="module")
def kaggle_csv(shared_data):
    csv = shared_data / "fundus-kaggle-dr" / "trainLabels.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} is absent")
    return csv


@pytest.mark.parametrize("task", ["referable", "grade"])
def test_dr_task_trains_and_evaluates_with_cis(task, kaggle_csv, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "dr-cache"  # shared by both tasks: features extracted once
    out = tmp_path_factory.mktemp(task)
    bundle = retinalens.train(kaggle_csv, out / "bundle", task=task, epochs=5, cache=cache)
    m = bundle.manifest.to_dict()
    assert m["task"] == task and m["classes"] == list(retinalens.data.tasks.TASKS[task].classes)
    # both eyes of a patient land in the same split
    splits = m["training"]["splits"]
    assert splits["train"]["n_patients"] + splits["val"]["n_patients"] + splits["test"]["n_patients"] == 75
    metrics = retinalens.evaluate(bundle, kaggle_csv, cache=cache, n_boot=200)
    # The whole CSV (no split column) is the training data: its own carved test split is what is scored.
    assert metrics["n_images"] == splits["test"]["n_images"] and metrics["overlap_with_training"] == 0
    assert metrics["data"]["scored"]["rule"].startswith("the bundle's own test split")
    for key in ("auc", "sensitivity", "specificity"):
        assert 0 <= metrics[key] <= 1 and len(metrics[f"{key}_ci"]) == 2
    assert ("quadratic_kappa" in metrics) == (task == "grade")
    if task == "grade":
        assert -1 <= metrics["quadratic_kappa"] <= 1 and len(metrics["quadratic_kappa_ci"]) == 2
