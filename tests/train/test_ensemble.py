"""An ensemble of a fine-tuned network and a head on frozen features (train/ensemble.py), cross-validated:
every member on the same folds, the bundle's calibration, referral threshold and gate fitted on the
mean of the members' out-of-fold probabilities, and the one bundle through predict and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import small_oct_dataset
from retinalens.bundle.network import Ensemble
from retinalens.data.hashing import sha256_files
from retinalens.models.heads import head_probabilities
from retinalens.predict.model import Model
from retinalens.train.ensemble import _out_of_fold, ensemble_config, member_runs
from retinalens.train.pipeline import build_run_config
from retinalens.trust.calibration import calibrated

MEMBERS = "efficientnet_lite0:finetune,efficientnet_lite0"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_oct_dataset(tmp_path_factory.mktemp("ftens-data"), per_class_train=6, per_class_test=1)


@pytest.fixture(scope="module")
def ens(data: Path, tmp_path_factory):
    import retinalens

    return retinalens.train(data, tmp_path_factory.mktemp("ftens") / "model", ensemble=MEMBERS, member_epochs=2,
                            cv=3, epochs=6, batch_size=16, workers=0, cache=str(tmp_path_factory.mktemp("ftens-cache")))


@pytest.fixture(scope="module")
def pixels(ens, data: Path) -> torch.Tensor:
    return torch.stack([ens.preprocessing.load(p) for p in sorted((data / "test").rglob("*.jpeg"))])


def test_member_runs_train_an_image_member_for_exactly_its_epochs() -> None:
    cfg = build_run_config("data", epochs=30, batch_size=64, head="conv")
    ens = ensemble_config(MEMBERS, seeds="0,1", member_epochs=5)
    runs = member_runs(cfg, ens, 4)
    assert [(r.extract.backbone, r.mode, r.train.seed) for r in runs] == [
        ("efficientnet_lite0", "finetune", 0), ("efficientnet_lite0", "finetune", 1),
        ("efficientnet_lite0", "bottleneck", 0), ("efficientnet_lite0", "bottleneck", 1)]
    assert all(r.cv == 4 for r in runs)  # the same folds for every member
    tuned, frozen = runs[0].train, runs[2].train
    assert (tuned.epochs, tuned.batch_size, tuned.head.kind) == (5, ens.member_batch_size, "auto")
    assert (frozen.epochs, frozen.batch_size, frozen.head.kind) == (30, 64, "conv")


def test_the_ensemble_is_calibrated_on_its_members_out_of_fold_mean(ens, data: Path) -> None:
    m = ens.manifest
    assert [(e.details["mode"], e.details.get("epochs")) for e in m.members] == [("finetune", 2), ("bottleneck", None)]
    assert m.members[0].backbone.weights_sha256 != m.members[1].backbone.weights_sha256  # the fine-tuned weights
    assert {e.backbone.preprocessing for e in m.members} == {ens.preprocessing}  # one input
    folds = json.loads((ens.path / "splits.json").read_text())["folds"]
    # every training image scored out of fold (not the 4 of a carved validation split, which the members
    # trained on under cross-validation)
    assert m.validation["n_images"] == len(folds) == 24
    assert m.validation["source"] == "3-fold cross-validation (out of fold, the members' mean)"
    assert m.calibration.fitted_on.startswith("out-of-fold")
    assert all(e.details["validation"]["source"] == "3-fold cross-validation (out of fold)" for e in m.members)
    assert m.gate is not None and m.referral_threshold is not None
    # per fold, the ensemble and each member alone: what comparing them on the same folds needs
    for v in (m.validation, *(e.details["validation"] for e in m.members)):
        assert len(v["fold_accuracy"]) == 3 and v["accuracy_mean"] == pytest.approx(np.mean(v["fold_accuracy"]), abs=1e-4)
    lead = m.training.cv.candidate()["fold_accuracy"]  # the first member's own CV record: the same folds
    assert m.members[0].details["validation"]["fold_accuracy"] == pytest.approx(lead, abs=1e-4)


def test_out_of_fold_mean_uses_the_images_every_member_scored() -> None:
    """Members may differ by an image (a near-duplicate of a test image on one backbone's features):
    the mean is over the images all of them scored, each member after its own temperature."""
    from types import SimpleNamespace

    hashes = ["a", "b", "c", "d"]
    p1 = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    p2 = np.array([[0.3, 0.7], [0.7, 0.3], [0.4, 0.6]])  # lacks "c"
    held_out = [{"sha256": hashes, "probabilities": p1, "fold": np.array([0, 1, 0, 1])},
                {"sha256": ["d", "a", "b"], "probabilities": p2, "fold": np.array([1, 0, 1])}]
    bundles = [SimpleNamespace(temperature=2.0), SimpleNamespace(temperature=None)]
    data = SimpleNamespace(hashes=["b", "a", "d", "c"], splits=SimpleNamespace(train=[0, 1, 2], val=[3]))
    held, each, fold, gate = _out_of_fold(bundles, held_out, data)
    assert held == [1, 0, 2]  # a, b, d as data's samples, in the first member's order
    np.testing.assert_allclose(each[0], calibrated(p1[[0, 1, 3]], 2.0))
    np.testing.assert_allclose(each[1], p2[[1, 2, 0]])
    assert fold.tolist() == [0, 1, 1] and gate == {"train": [0, 2], "val": [1]}


def test_predict_averages_the_fine_tuned_and_the_frozen_member(ens, pixels: torch.Tensor) -> None:
    manual = []
    for member in ens.members:
        spatial, pooled = member.backbone.encode(pixels, member.precision)
        feats = spatial if member.head_config.input_kind == "spatial" else pooled
        manual.append(calibrated(head_probabilities(member.head, feats), member.temperature))
    expected = calibrated(np.mean(manual, axis=0), ens.temperature)
    np.testing.assert_allclose(Model(ens, runtime="torch").probabilities(pixels), expected, atol=1e-9)
    assert np.abs(manual[0] - manual[1]).max() > 1e-3  # two different networks were averaged


def test_one_onnx_graph_matches_the_eager_ensemble(ens, pixels: torch.Tensor) -> None:
    from retinalens.export.formats import onnx_bytes
    from retinalens.export.graph import graph_temperature
    from retinalens.export.runtime import OnnxModel

    graph, meta = onnx_bytes(ens)
    with torch.inference_mode():
        ref, _ = Ensemble.from_bundle(ens, temperature=graph_temperature(ens)).eval()(pixels)
    probs, _ = OnnxModel(graph).run(pixels)
    assert np.abs(probs - ref.numpy()).max() < 1e-4
    assert len(meta["ensemble"]["members"]) == 2


def test_evaluate_scores_the_ensemble_on_the_test_split(ens, data: Path) -> None:
    from retinalens.evaluate.run import evaluate_bundle

    test = sorted((data / "test").rglob("*.jpeg"))
    r = evaluate_bundle(ens, data, n_boot=0, progress=False)
    assert r["n_images"] == len(test) and r["overlap_with_training"] == 0
    assert set(json.loads((ens.path / "splits.json").read_text())["sha256"]["test"]) == set(sha256_files(test))


def test_an_interrupted_ensemble_resumes_from_its_finished_members(ens, data: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import retinalens
    from retinalens.errors import RetinaLensError
    from retinalens.train import ensemble as module

    out, cache = tmp_path / "model", ens.manifest.training.config["extract"]["cache"]
    options = {"ensemble": MEMBERS, "member_epochs": 2, "cv": 3, "epochs": 6, "batch_size": 16, "workers": 0,
               "cache": cache}
    real, calls = module.train_bundle, []

    def stop_at_the_second_member(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "train_bundle", stop_at_the_second_member)
    with pytest.raises(KeyboardInterrupt):
        retinalens.train(data, out, **options)
    assert (tmp_path / "model.members" / "member0.done.pt").is_file() and not out.exists()
    with pytest.raises(RetinaLensError, match="holds the members of an interrupted run: pass --resume"):
        retinalens.train(data, out, **options)
    calls.clear()
    monkeypatch.setattr(module, "train_bundle", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = retinalens.train(data, out, resume=True, **options)
    assert len(calls) == 1  # the fine-tuned member was kept, only the second one trained
    assert not (tmp_path / "model.members").exists()
    assert resumed.manifest.validation == ens.manifest.validation  # as if never stopped
    for a, b in zip(resumed.members, ens.members):
        sa, sb = a.head.state_dict(), b.head.state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_a_run_that_fails_before_any_member_is_written_leaves_no_members_folder(data: Path, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    import retinalens
    from retinalens.train import ensemble as module

    views = []

    def disk_full(run, folder, **kwargs):  # the members folder made, then the first write fails
        views.append(run.extract.view)
        (folder.parent / "empty").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "train_bundle", disk_full)
    with pytest.raises(OSError):  # the CLI makes it one clear error (tests/cli/test_writes.py)
        retinalens.train(data, tmp_path / "model", cv=0, workers=0, cache=tmp_path / "cache")  # two views: 2 members
    assert views == ["squash"] and list(tmp_path.glob("model*")) == []  # nothing to resume: no folder asks for it
