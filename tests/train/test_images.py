"""Training on images (frozen, finetune, scratch): real scans, real bundles, resume after kill -9."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import retinalens
from helpers import cli_command, kill_after_epoch
from retinalens.errors import RetinaLensError
from retinalens.models.registry import create_backbone
from retinalens.train.images import CHECKPOINT, backbone_groups


def _train(data: Path, out: Path, cache: Path, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 16)
    return retinalens.train(data, out, cache=cache, **kw)


def _check_predicts(bundle_path: Path, data: Path) -> dict:
    model = retinalens.load(bundle_path)
    r = model.predict(next((data / "test" / "CNV").glob("*.jpeg")))
    p = np.array(list(r["probabilities"].values()))
    assert r["label"] in model.classes and np.isfinite(p).all() and abs(p.sum() - 1) < 1e-5
    m = retinalens.evaluate(bundle_path, data, n_boot=20)
    assert m["n_images"] == 16 and 0 <= m["accuracy"] <= 1
    return m


def test_frozen_mode_trains_the_original_head_on_images(tmp_path, small_dataset, feature_cache, backbone):
    out = tmp_path / "frozen"
    b = _train(small_dataset, out, feature_cache, mode="frozen")
    assert b.manifest.to_dict()["training"]["mode"] == "frozen"
    assert b.manifest.to_dict()["head"]["kind"] == "linear" and b.manifest.to_dict()["head"]["hidden"] == 64  # GAP + Dense(64) + softmax
    assert b.manifest.to_dict()["backbone"]["weights_sha256"] == backbone.weights_sha256  # frozen: the ImageNet weights as they were
    assert b.manifest.to_dict()["training"]["head_selection"]["augment"] == "oct"
    assert (out / "curves.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert not out.with_name("frozen.checkpoints").exists()  # the bundle holds everything now
    _check_predicts(out, small_dataset)


def test_finetune_trains_only_the_last_groups_and_keeps_batchnorm_statistics(tmp_path, small_dataset, feature_cache, backbone):
    out = tmp_path / "ft"
    b = _train(small_dataset, out, feature_cache, mode="finetune", unfreeze=1, warmup_epochs=1)
    tuned = load_file(str(out / "backbone.safetensors"))
    before = backbone.model.state_dict()
    assert b.manifest.to_dict()["backbone"]["weights_sha256"] != backbone.weights_sha256
    last = {id(p) for p in backbone_groups(backbone.model)[-1]}
    names = {n for n, p in backbone.model.named_parameters() if id(p) in last}
    changed = {n for n in names if not torch.equal(tuned[n], before[n])}
    assert changed, "the unfrozen group did not train"
    for n, p in backbone.model.named_parameters():
        if n not in names:
            assert torch.equal(tuned[n], before[n]), f"{n} is frozen but changed"
    stats = [n for n in before if n.endswith("running_mean")]
    assert all(torch.equal(tuned[n], before[n]) for n in stats)  # BatchNorm statistics kept (eval mode)
    assert "fine-tuned" in b.manifest.to_dict()["backbone"]["weights_source"]
    _check_predicts(out, small_dataset)


def test_eyenet_trains_from_scratch_into_a_bundle(tmp_path, small_dataset, feature_cache):
    out = tmp_path / "eyenet"
    b = _train(small_dataset, out, feature_cache, mode="scratch", backbone="eyenet", epochs=1)
    assert b.manifest.to_dict()["backbone"]["name"] == "eyenet" and b.manifest.to_dict()["head"]["kind"] == "dense"
    assert b.manifest.to_dict()["features"]["feature_shape"] == [32, 31, 31]
    assert b.backbone.preprocessing.size == 256
    baseline = b.manifest.to_dict()["training"]["baseline_logistic_regression"]
    assert 0 <= baseline["val_acc"] <= 1  # measured against the pretrained default backbone's features
    _check_predicts(out, small_dataset)


@pytest.mark.parametrize("kw, message", [
    ({"backbone": "eyenet"}, "no pretrained weights"),
    ({"mode": "scratch"}, "--mode scratch is for models without pretrained weights"),
    ({"mode": "frozen", "backbone": "eyenet"}, "use --mode scratch"),
    ({"balance": "oversample"}, "cannot do"),
    ({"mode": "frozen", "head": "logreg"}, "unknown head 'logreg'"),
    ({"mode": "sideways"}, "unknown --mode"),
    ({"mode": "finetune", "backbone_lr_scale": 2.0}, "backbone-lr-scale"),
    ({"mode": "frozen", "augment": "rainbow"}, "unknown augmentation"),
])
def test_option_mistakes_are_found_before_any_work(tmp_path, small_dataset, kw, message):
    with pytest.raises(RetinaLensError, match=message):
        retinalens.train(small_dataset, tmp_path / "x", cache=tmp_path / "never-made", **kw)
    assert not (tmp_path / "never-made").exists()


def test_backbone_groups_cover_every_parameter_in_order(backbone):
    groups = backbone_groups(backbone.model)
    flat = [id(p) for g in groups for p in g]
    assert sorted(flat) == sorted(id(p) for p in backbone.model.parameters())
    first = dict(backbone.model.named_parameters())["conv_stem.weight"]
    assert any(p is first for p in groups[0])  # the stem first: "the last N" are the deepest
    assert len(create_backbone("eyenet").model.features) and backbone_groups(create_backbone("eyenet").model)


def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path, small_dataset, feature_cache):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    common = [str(small_dataset), "--mode", "frozen", "--epochs", "6", "--batch-size", "16", "--quiet",
              "--cache", str(feature_cache)]
    ref = subprocess.run(cli_command("train", *common, "--out", str(tmp_path / "ref")), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr + ref.stdout

    out = tmp_path / "killed"
    ckpt = out.with_name("killed.checkpoints") / CHECKPOINT
    killed_at = kill_after_epoch(cli_command("train", *common, "--out", str(out)), env, ckpt, 2)
    assert 2 <= killed_at < 6 and not out.exists()

    again = subprocess.run(cli_command("train", *common, "--out", str(out)), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr + again.stdout  # never silently overwritten
    other = subprocess.run(cli_command("train", *common, "--lr", "0.01", "--resume", "--out", str(out)), env=env,
                           capture_output=True, text=True)
    assert other.returncode == 2 and "other data, splits or options" in other.stderr + other.stdout

    resumed = subprocess.run(cli_command("train", *common, "--resume", "--out", str(out)), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"resuming after epoch {killed_at}" in resumed.stdout + resumed.stderr
    a, b = load_file(str(tmp_path / "ref" / "head.safetensors")), load_file(str(out / "head.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "curves.csv").read_text() == (out / "curves.csv").read_text()
