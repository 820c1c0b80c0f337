"""Model bundles on disk: the one artefact every command reads.

A bundle is a folder: `manifest.json` (what the model is, how to feed it, what it was trained on,
how it scored on validation; typed and validated by `manifest.py`), weights in safetensors
(`head.safetensors`, `backbone.safetensors`: tensors only, nothing is ever unpickled), and the run's
side files `config.json`, `splits.json` and `curves.csv`, which are read here and nowhere else.
Every file is hashed in the manifest and checked on load.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from .._io import atomic_write_json, check_creatable
from ..data.tasks import Task
from ..data.transforms import Preprocessing
from ..errors import RetinaLensError
from ..models.heads import HeadConfig, create_head
from ..models.registry import Backbone, create_backbone
from .manifest import FORMAT, Manifest

BUNDLE_FORMAT = FORMAT
MANIFEST = "manifest.json"
CONFIG, SPLITS, CURVES = "config.json", "splits.json", "curves.csv"
# Kermany et al.: choroidal neovascularisation and diabetic macular oedema need urgent referral,
# drusen (early AMD) routine follow-up, a normal scan observation.
OCT_REFERRAL = {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}


def default_referral(classes: list[str]) -> dict[str, str | None]:
    return {c: OCT_REFERRAL.get(c.upper()) for c in classes}


def positive_classes_for(classes: list[str], task: Task | None) -> list[str]:
    """The classes whose detection is the referral decision: the task's, or the urgent OCT ones."""
    return list(task.positive_classes) if task else [c for c in classes if OCT_REFERRAL.get(c.upper()) == "urgent"]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("retinalens", "torch", "timm", "numpy", "pillow", "safetensors", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _sha256(path: Path) -> str:
    from ..data.hashing import sha256_file

    return sha256_file(path)


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    head: nn.Module
    _backbone: Backbone | None = field(default=None, repr=False)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def referral(self) -> dict[str, str | None]:
        return dict(self.manifest.referral)

    @property
    def positive_classes(self) -> list[str]:
        return list(self.manifest.positive_classes)

    @property
    def head_config(self) -> HeadConfig:
        return self.manifest.head

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.backbone.preprocessing

    @property
    def temperature(self) -> float | None:
        """The calibration temperature, or None (a bundle from before calibration)."""
        return self.manifest.calibration.temperature if self.manifest.calibration else None

    @property
    def manifest_sha256(self) -> str:
        """The model's identity: the hash of manifest.json, which names every weights file by its hash."""
        return _sha256(self.path / MANIFEST)

    @cached_property
    def backbone(self) -> Backbone:
        """The frozen backbone, rebuilt from the bundle's own weights (no hub, no pickle)."""
        info = self.manifest.backbone
        bb = create_backbone(info.name, weights=self.path / "backbone.safetensors")
        if bb.weights_sha256 != info.weights_sha256:
            raise RetinaLensError(f"{self.path}: backbone weights do not match the manifest's hash")
        if bb.preprocessing != self.preprocessing:
            bb.preprocessing = self.preprocessing  # the bundle's recorded preprocessing wins
        return bb

    # -- side files: written by training, read here only ---------------------------------------------

    def run_config(self) -> dict[str, Any]:
        """The run's config as it was saved (config.json), for retraining the same way."""
        return self._side_json(CONFIG, "the run's config")

    def split_hashes(self) -> dict[str, set[str]]:
        """sha256 of every image in each split the model was built with (splits.json), {} if absent."""
        if not (self.path / SPLITS).is_file():
            return {}
        saved = self._side_json(SPLITS, "the splits")
        try:
            return {name: set(hashes) for name, hashes in saved["sha256"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise RetinaLensError(f"{self.path / SPLITS}: cannot read the splits ({type(exc).__name__})") from None

    def curves_file(self) -> Path | None:
        """curves.csv (the training history), or None for a head without epochs."""
        f = self.path / CURVES
        return f if f.is_file() else None

    def _side_json(self, name: str, what: str) -> dict[str, Any]:
        f = self.path / name
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise RetinaLensError(f"{f}: cannot read {what} ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise RetinaLensError(f"{f}: cannot read {what} (not a JSON object)")
        return data


def save_bundle(out: str | Path, *, backbone: Backbone, head: nn.Module, head_config: HeadConfig,
                classes: list[str], precision: str, feature_shape: tuple[int, int, int],
                sections: dict[str, Any], files: dict[str, bytes] | None = None,
                referral: dict[str, str | None] | None = None, task: Task | None = None) -> Path:
    """Write the bundle into a temp folder beside `out`, then swap it in: never half a bundle."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    check_output_folder(out)
    for stale in out.parent.glob(f".{out.name}.*.tmp") if out.parent.is_dir() else ():
        if time.time() - stale.stat().st_mtime > 3600:  # left by a run killed over an hour ago
            shutil.rmtree(stale, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise RetinaLensError(f"cannot write the bundle at {out}: {exc.strerror or exc}") from None
    try:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))
        save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(tmp / "backbone.safetensors"))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = {
            "format": BUNDLE_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "task": task.name if task else ("oct" if set(classes) == set(OCT_REFERRAL) else "classes"),
            "classes": classes,
            "referral": referral or default_referral(classes),
            # the referral decision that evaluation reports as sensitivity / specificity / AUC
            "positive_classes": positive_classes_for(classes, task),
            "backbone": backbone.describe(),
            "features": {"precision": precision, "feature_shape": list(feature_shape), "dtype": "float16"},
            "head": head_config.to_dict(),
            "thresholds": {},
            **sections,
            "library_versions": library_versions(),
            "files": {p.name: _sha256(p) for p in sorted(tmp.glob("*.safetensors"))},
        }
        atomic_write_json(tmp / MANIFEST, Manifest.from_dict(manifest, str(out)).to_dict())  # never write a bad one
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared, like every output
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_bundle(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def check_output_folder(out: Path) -> None:
    """A bundle may replace an older bundle, never a file or a folder of anything else."""
    if out.is_file():
        raise RetinaLensError(f"--out {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise RetinaLensError(f"--out {out} is a folder that is not a RetinaLens bundle; give a new or empty folder")
    check_creatable(out, out)


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle. Raises RetinaLensError for anything that is not a sound bundle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        raise RetinaLensError(f"{path}: not a RetinaLens model bundle (no {MANIFEST})")
    try:
        document = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise RetinaLensError(f"{path}: unreadable bundle manifest ({type(exc).__name__})") from None
    manifest = Manifest.from_dict(document, str(path))
    for name, digest in manifest.files.items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise RetinaLensError(f"{path}: {name} is missing or does not match its hash in the manifest")
    classes, feature_shape, head_cfg = manifest.classes, manifest.feature_shape, manifest.head
    head = create_head(head_cfg, feature_shape, len(classes))  # type: ignore[arg-type]
    try:
        head.load_state_dict(load_file(str(path / "head.safetensors")))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise RetinaLensError(f"{path}: head weights do not load ({type(exc).__name__})") from None
    return Bundle(path, manifest, head.eval())
