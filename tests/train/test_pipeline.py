import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from helpers import small_run_config, train_small_bundle
from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.errors import RetinaLensError
from retinalens.predict.model import Model
from retinalens.train.ensemble import ensemble_config, two_view_fits
from retinalens.train.pipeline import build_run_config, resolve_resize, run_config_from_dict
from retinalens.train.selection import find_data


def test_bundle_manifest_describes_the_run(small_bundle):
    m = small_bundle.manifest.to_dict()
    assert m["classes"] == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert m["referral"] == {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}
    assert m["backbone"]["name"] == "efficientnet_lite0" and len(m["backbone"]["weights_sha256"]) == 64
    assert m["backbone"]["preprocessing"]["size"] == 224
    splits = m["training"]["splits"]
    for name in ("train", "val", "test"):
        assert splits[name]["n_images"] > 0 and 0 < splits[name]["n_patients"] <= splits[name]["n_images"]
    assert splits["test"]["n_images"] == 16  # the given test split, untouched
    assert 0 <= m["validation"]["accuracy"] <= 1
    assert "val_acc" in m["training"]["baseline_logistic_regression"]
    assert {"torch", "timm", "numpy"} <= set(m["library_versions"])
    assert (small_bundle.path / "curves.png").is_file() and (small_bundle.path / "curves.csv").is_file()


def test_config_saved_with_the_run_round_trips(small_bundle, small_dataset, feature_cache):
    saved = json.loads((small_bundle.path / "config.json").read_text())
    assert saved["train"]["head"]["kind"] == "conv"
    assert saved["extract"]["backbone"] == "efficientnet_lite0"
    # Read back as retraining reads it: the very config that trained the bundle, and config.json again
    # when re-serialised the way the bundle writes it (JSON of dataclasses.asdict).
    again = run_config_from_dict(saved)
    assert again == small_run_config(small_dataset, feature_cache)
    assert json.loads(json.dumps(asdict(again), default=str)) == saved


def test_splits_file_is_patient_and_file_disjoint(small_bundle):
    s = json.loads((small_bundle.path / "splits.json").read_text())["sha256"]
    assert not (set(s["train"]) & set(s["val"])) and not (set(s["train"]) & set(s["test"]))
    assert not (set(s["val"]) & set(s["test"]))


def test_same_seed_gives_identical_bundles(tmp_path, small_dataset, feature_cache):
    a = train_small_bundle(small_dataset, tmp_path / "a", feature_cache, epochs=4, seed=7)
    b = train_small_bundle(small_dataset, tmp_path / "b", feature_cache, epochs=4, seed=7)
    ha, hb = load_file(str(a.path / "head.safetensors")), load_file(str(b.path / "head.safetensors"))
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)


def test_linear_head_bundle(tmp_path, small_dataset, feature_cache):
    b = train_small_bundle(small_dataset, tmp_path / "lin", feature_cache, head="linear", epochs=4)
    assert b.manifest.to_dict()["head"]["kind"] == "linear"
    assert b.head_config.input_kind == "pooled"


def test_auto_head_keeps_the_better_candidate_on_validation(tmp_path, small_dataset, feature_cache):
    b = train_small_bundle(small_dataset, tmp_path / "auto", feature_cache, head="auto", epochs=6)
    sel = b.manifest.to_dict()["training"]["head_selection"]
    assert set(sel["candidates"]) == {"conv", "logreg"}
    best = max(sel["candidates"], key=lambda k: (sel["candidates"][k]["val_acc"], -sel["candidates"][k]["val_loss"]))
    assert sel["chosen"] == best == b.manifest.to_dict()["head"]["kind"]
    assert b.manifest.to_dict()["validation"]["accuracy"] == pytest.approx(sel["candidates"][best]["val_acc"])
    # never below the logistic-regression baseline on the same split
    assert b.manifest.to_dict()["validation"]["accuracy"] >= b.manifest.to_dict()["training"]["baseline_logistic_regression"]["val_acc"]


def test_logreg_bundle_predicts_like_its_validation_score(tmp_path, small_dataset, feature_cache, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    fitted, real_fit = [], LogisticRegression.fit

    def counted_fit(self, *args, **kwargs):  # the real fit, counted by C
        fitted.append(self.C)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", counted_fit)
    b = train_small_bundle(small_dataset, tmp_path / "lr", feature_cache, head="logreg")
    # The C=0.1 baseline is one of the C search's candidates: each C is fitted once, not 0.1 twice.
    assert sorted(c for c in fitted if c in (0.01, 0.1, 1.0)) == [0.01, 0.1, 1.0]
    assert b.manifest.to_dict()["training"]["baseline_logistic_regression"]["C"] == 0.1
    assert b.manifest.to_dict()["head"]["kind"] == "logreg" and b.head_config.input_kind == "pooled"
    assert not (b.path / "curves.csv").exists()  # a fitted head has no epochs
    # The validation images, found by content (splits.json lists their sha256), predicted from the files
    # through the inference path: their accuracy is the one the manifest records.
    val = set(json.loads((b.path / "splits.json").read_text())["sha256"]["val"])
    samples = discover(small_dataset).samples
    picked = [s for s, h in zip(samples, sha256_files(s.path for s in samples)) if h in val]
    assert len(picked) == len(val) > 0
    results = Model(b, runtime="torch").predict_many([s.path for s in picked])  # torch: the encoder of the cache
    # The argmax, not `label`: the gate withholds the label of an image it rejects; the score ignores the gate
    predicted = [max(r["probabilities"], key=r["probabilities"].get) for r in results]
    accuracy = sum(p == s.label for p, s in zip(predicted, picked)) / len(picked)
    assert accuracy == pytest.approx(b.manifest.to_dict()["validation"]["accuracy"], abs=1e-9)


def test_unknown_head_is_a_clear_error(tmp_path, small_dataset, feature_cache):
    with pytest.raises(RetinaLensError, match="unknown head"):
        train_small_bundle(small_dataset, tmp_path / "x", feature_cache, head="transformer", epochs=1)
    assert not (tmp_path / "x").exists()


def _resolved(cfg, ens=None) -> str:
    return resolve_resize(cfg, two_view_fits(cfg, ens or ensemble_config()), find_data(cfg).classes).extract.resize


def test_resize_auto_takes_the_two_view_input_for_oct_scans_where_the_run_can(tmp_path, small_dataset, make_png):
    cfg = build_run_config(small_dataset)
    assert cfg.extract.resize == "auto"
    assert _resolved(cfg) == "squash+band"
    assert resolve_resize(cfg).extract.resize == "squash"  # a single network (train_bundle) has one view
    # Runs that cannot take it: image modes, test-time views, an image-mode member.
    assert _resolved(build_run_config(small_dataset, mode="frozen")) == "squash"
    assert _resolved(cfg, ensemble_config(tta="flip")) == "squash"
    assert _resolved(cfg, ensemble_config("efficientnet_lite0,efficientnet_lite0:finetune")) == "squash"
    assert _resolved(cfg, ensemble_config(seeds="0,1")) == "squash+band"
    assert _resolved(cfg, ensemble_config(seeds=",".join(map(str, range(9))))) == "squash"  # 18 > 16 members
    assert _resolved(build_run_config(small_dataset, backbone="vit_small_patch16_224")) == "squash"  # square only
    # Labels that are not the four OCT classes: a DR task, or other class folders.
    assert _resolved(build_run_config(small_dataset, task="referable")) == "squash"
    for i, name in enumerate(("healthy", "amd")):
        make_png(tmp_path / "other" / name / f"{name}-{i}-1.png", i)
    assert _resolved(build_run_config(tmp_path / "other")) == "squash"
    # A choice given is kept as given, and a bundle's config.json from before --resize reads back as the squash.
    assert _resolved(build_run_config(small_dataset, resize="squash")) == "squash"
    assert _resolved(run_config_from_dict({"data": str(small_dataset), "extract": {}})) == "squash"
