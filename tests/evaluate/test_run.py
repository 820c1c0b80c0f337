import json
import shutil

import numpy as np
import pytest

from retinalens.errors import RetinaLensError
from retinalens.evaluate.run import evaluate_bundle
from retinalens.predict.model import Model

REQUIRED = {"accuracy", "n_images", "per_class", "confusion_matrix", "classes", "roc_auc_macro", "urgent_referral",
            "accuracy_ci", "roc_auc_macro_ci"}


def test_evaluate_writes_json_and_report(small_bundle, small_dataset, feature_cache, tmp_path):
    m = evaluate_bundle(small_bundle, small_dataset, cache=feature_cache, json_path=tmp_path / "m.json",
                        report_path=tmp_path / "r.html", n_boot=200, progress=False)
    assert REQUIRED <= set(m)
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["accuracy"] == m["accuracy"] and on_disk["n_images"] == 16
    for c in m["classes"]:
        assert {"precision", "recall", "f1", "sensitivity", "specificity", "support"} <= set(m["per_class"][c])
    assert np.sum(m["confusion_matrix"]) == 16
    u = m["urgent_referral"]
    assert u["positive_classes"] == ["CNV", "DME"] and len(u["sensitivity_ci"]) == 2
    assert m["overlap_with_training"] == 0
    html = (tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # confusion, ROC, training curves
    title = f"RetinaLens evaluation of {small_bundle.path.name} on {small_dataset.name}, test split"
    assert f"<title>{title}</title>" in html  # the model, the data set and the split
    best = small_bundle.manifest.training.best_epoch
    assert best and f"The dotted line marks epoch {best}, whose weights the bundle kept" in html


def test_evaluate_matches_predict(small_bundle, small_dataset, feature_cache):
    """Evaluation (through the cache) and prediction (straight from pixels) agree."""
    m = evaluate_bundle(small_bundle, small_dataset, cache=feature_cache, n_boot=0, progress=False)
    preds = Model(small_bundle).predict_many([small_dataset / "test"])
    labels = [p["label"] for p in preds]
    truth = [p["input"].split("/")[-2] for p in preds]
    assert np.mean([a == b for a, b in zip(labels, truth)]) == pytest.approx(m["accuracy"])


def test_plain_class_folders_are_evaluated_whole(small_bundle, small_dataset, feature_cache):
    m = evaluate_bundle(small_bundle, small_dataset / "test", cache=feature_cache, n_boot=0, progress=False)
    assert m["n_images"] == 16 and m["overlap_with_training"] == 0


def test_training_images_are_left_out_unless_asked(small_bundle, small_dataset, feature_cache):
    # Every image of train/ trained or validated the model: nothing unseen is left to score.
    with pytest.raises(RetinaLensError, match="all 48 images were in the model's training or validation data"):
        evaluate_bundle(small_bundle, small_dataset / "train", cache=feature_cache, n_boot=0, progress=False)
    m = evaluate_bundle(small_bundle, small_dataset / "train", cache=feature_cache, n_boot=0, progress=False,
                        include_training=True)
    assert m["n_images"] == 48
    assert m["overlap_with_training"] > 0  # these images trained the model: flagged
    assert m["data"]["scored"]["rule"].startswith("every image (--include-training)")


def test_missing_split_and_unknown_classes_are_errors(small_bundle, small_dataset, feature_cache, tmp_path):
    with pytest.raises(RetinaLensError, match="no 'validation' split|no 'nope' split"):
        evaluate_bundle(small_bundle, small_dataset, split="nope", cache=feature_cache, progress=False)
    data = tmp_path / "odd"
    shutil.copytree(small_dataset / "test", data)
    (data / "CNV").rename(data / "GLAUCOMA")
    with pytest.raises(RetinaLensError, match="GLAUCOMA"):
        evaluate_bundle(small_bundle, data, cache=feature_cache, progress=False)


def test_cache_of_another_backbone_is_refused(small_bundle, small_dataset, tmp_path):
    from retinalens.features.extract import open_cache
    from retinalens.models.registry import create_backbone

    other = open_cache(tmp_path / "c", create_backbone(pretrained=False), "fp32")  # random weights
    with pytest.raises(RetinaLensError, match="feature cache"):
        evaluate_bundle(small_bundle, small_dataset, cache=other.dir, progress=False)
