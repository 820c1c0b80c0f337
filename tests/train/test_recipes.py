"""Fine-tuning recipes: the registry, the weight EMA, the BatchNorm policy, the OCT augmentation and resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import cli_command, kill_after_epoch, run_cli
from retinalens.bundle.store import load_bundle
from retinalens.data.augment import get_augmentation, sample_rng
from retinalens.data.discover import discover
from retinalens.errors import RetinaLensError
from retinalens.models.heads import HeadConfig
from retinalens.train.images import CHECKPOINT, train_on_images
from retinalens.train.recipes import RECIPES, get_recipe, reestimate_batchnorm
from retinalens.train.trainer import TrainConfig
from retinalens.config import ImageTrainConfig


def test_the_registry_names_its_recipes_and_refuses_others():
    assert {"classic", "adamw-ema"} <= set(RECIPES)
    assert get_recipe("adamw-ema").ema_decay and get_recipe("classic").ema_decay is None
    with pytest.raises(RetinaLensError, match="unknown --recipe 'fast': use one of classic, adamw-ema"):
        get_recipe("fast")


@pytest.mark.parametrize("args, message", [
    (["--mode", "finetune", "--recipe", "fast"], "unknown --recipe 'fast'"),
    (["--mode", "finetune", "--batchnorm", "train"], "unknown --batchnorm 'train'"),
    (["--mode", "frozen", "--recipe", "adamw-ema"], "options of --mode finetune"),
])
def test_cli_recipe_mistakes_exit_2_with_one_message(tmp_path, small_dataset, args, message):
    r = run_cli("train", small_dataset, "--out", tmp_path / "m", "--cache", tmp_path / "never-made", *args)
    assert r.returncode == 2 and message in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and not (tmp_path / "never-made").exists()


def _split(root: Path) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
    ds = discover(root / "train")
    paths = [s.path for s in ds.samples]
    y = np.array([ds.classes.index(s.label) for s in ds.samples])
    val = list(range(0, len(paths), 6))  # a few scans of every class for validation
    rest = [i for i in range(len(paths)) if i not in val]
    return [paths[i] for i in rest], y[rest], [paths[i] for i in val], y[val]


def test_ema_weights_are_what_is_validated_and_saved(tmp_path, small_dataset, backbone):
    paths, y, val_paths, y_val = _split(small_dataset)
    images = ImageTrainConfig(recipe="adamw-ema")
    r = train_on_images(backbone, HeadConfig(kind="linear", hidden=64), mode="finetune", paths=paths, y_train=y,
                        val_paths=val_paths, y_val=y_val, num_classes=4, train=TrainConfig(epochs=1, batch_size=16),
                        images=images, augment="oct-scan", checkpoint_dir=tmp_path, fingerprint={"t": 1},
                        progress=False)
    state = torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=True)["net"]
    raw = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    ema = {k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    assert raw.keys() == ema.keys()
    moved = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], ema[k])]
    assert moved, "the EMA equals the raw weights after training steps"
    saved = {f"features.{k}": v for k, v in r.backbone.model.state_dict().items()}
    saved |= {f"head.{k}": v for k, v in r.result.head.state_dict().items()}
    assert all(torch.equal(v, ema[k]) for k, v in saved.items())  # the bundled weights are the EMA's
    assert any(not torch.equal(v, raw[k]) for k, v in saved.items())
    before = backbone.model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    tuned = r.backbone.model.state_dict()
    assert stats and all(torch.equal(tuned[k], before[k]) for k in stats)  # --batchnorm frozen: ImageNet's


def test_reestimation_changes_only_batchnorm_statistics(backbone, oct_images):
    model = copy.deepcopy(backbone.model)
    pp = backbone.preprocessing
    x = pp.normalize(torch.stack([pp.load(p) for p in oct_images[:8]]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_batchnorm(model, [x[:4], x[4:]]) == 8
    after = model.state_dict()
    stats = {k for k in before if k.endswith(("running_mean", "running_var"))}
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # measured on OCT, not ImageNet's
    weights = {k for k, _ in model.named_parameters()}
    assert weights and all(torch.equal(before[k], after[k]) for k in weights)
    assert not model.training  # left as it was: eval
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms)  # the momentum is restored


def test_oct_scan_augmentation_is_a_function_of_seed_epoch_and_position(oct_images, backbone):
    img = backbone.preprocessing.load(oct_images[0])
    aug = get_augmentation("oct-scan")
    a = aug(img, sample_rng(0, 1, 3))
    assert torch.equal(a, aug(img, sample_rng(0, 1, 3)))
    assert a.shape == img.shape and a.dtype == torch.uint8 and not torch.equal(a, img)
    for other in (sample_rng(0, 1, 4), sample_rng(0, 2, 3), sample_rng(1, 1, 3)):
        assert not torch.equal(a, aug(img, other))
    plain = get_augmentation("oct")
    # The same draws up to the extra ones: crop and speckle are the only difference from `oct`.
    assert not torch.equal(a, plain(img, sample_rng(0, 1, 3)))


def test_adamw_ema_cpu_resumed_after_kill_gives_the_uninterrupted_weights(tmp_path, small_dataset, feature_cache):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    common = [str(small_dataset), "--mode", "finetune", "--recipe", "adamw-ema-cpu", "--batchnorm", "reestimate",
              "--epochs", "2", "--batch-size", "16", "--cv", "0", "--quiet", "--cache", str(feature_cache)]
    ref = subprocess.run(cli_command("train", *common, "--out", str(tmp_path / "ref")), env=env, capture_output=True,
                         text=True)
    assert ref.returncode == 0, ref.stderr + ref.stdout
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["images"]["recipe"] == "adamw-ema-cpu" and config["images"]["batchnorm"] == "reestimate"
    # The recipe's values are in the bundle, not only its name, and `--augment auto` took its OCT
    # augmentation, `oct` since the ablation (README): a later change of a recipe's default shows.
    selection = load_bundle(tmp_path / "ref").manifest.to_dict()["training"]["head_selection"]
    assert selection["recipe"] == asdict(get_recipe("adamw-ema-cpu")) and selection["recipe"]["ema_decay"] == 0.998
    assert selection["recipe"]["oct_augment"] == "oct" and selection["augment"] == "oct"

    out = tmp_path / "killed"
    ckpt = out.with_name("killed.checkpoints") / CHECKPOINT
    assert kill_after_epoch(cli_command("train", *common, "--out", str(out)), env, ckpt, 1) == 1 and not out.exists()

    resumed = subprocess.run(cli_command("train", *common, "--resume", "--out", str(out)), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    for name in ("head.safetensors", "backbone.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "ref" / "curves.csv").read_text() == (out / "curves.csv").read_text()
    # Re-estimated on the training scans: the bundled statistics are not ImageNet's.
    from retinalens.models.registry import create_backbone

    imagenet = create_backbone().model.state_dict()
    tuned = load_file(str(out / "backbone.safetensors"))
    assert not torch.equal(tuned["bn1.running_mean"], imagenet["bn1.running_mean"])
