"""Model bundles on disk: the one artefact every command reads.

A bundle is a folder: `manifest.json` (what the model is, how to feed it, what it was trained on,
how it scored on validation; typed and validated by `manifest.py`), weights in safetensors
(`head.safetensors`, `backbone.safetensors`: tensors only, nothing is ever unpickled), and the run's
side files `config.json`, `splits.json`, `curves.csv` / `curves.png` and the gate's
`gate.safetensors`, which are read here (and by trust/gate.py) only.

Integrity: the manifest's `files` lists the sha256 of every file of the bundle (but itself and
`signature.json`), and load refuses a bundle where one is missing, differs, or where an unlisted file
that a command would read (weights, side files) lies in the folder. The bundle's digest, the sha256 of the canonical manifest (what
`sha256sum manifest.json` prints for a bundle RetinaLens wrote), therefore stands for every byte of it:
it is the bundle's identity (`Bundle.digest`, `retinalens verify`, the model card's version), and what
a key signs (signature.py: the threat model).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .._io import TEMP_PREFIX, TEMP_SUFFIX, atomic_write_bytes, canonical_json, check_creatable, temp_folder, writing
from ..data.tasks import Task
from ..data.transforms import Preprocessing
from ..errors import RetinaLensError
from ..models.heads import HeadConfig
from ..models.registry import Backbone
from .manifest import FORMAT, Manifest, parse
from .members import CLASSES_KEY, BundleMember, load_head
from .signature import SIGNATURE, check_signature, configured_key, manifest_digest, sign

BUNDLE_FORMAT = FORMAT
MANIFEST = "manifest.json"
CONFIG, SPLITS, CURVES = "config.json", "splits.json", "curves.csv"
CURVES_PNG = "curves.png"
READ = (CONFIG, SPLITS, CURVES, CURVES_PNG)  # the side files commands read: hashed whenever present
# Kermany et al.: choroidal neovascularisation and diabetic macular oedema need urgent referral,
# drusen (early AMD) routine follow-up, a normal scan observation.
OCT_REFERRAL = {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}


def is_oct(classes: list[str]) -> bool:
    """Labels that are Kermany's four OCT classes (the manifest's task "oct")."""
    return set(classes) == set(OCT_REFERRAL)


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
    digest: str  # manifest_digest(manifest): the bundle's identity
    signature: dict[str, Any] | None = None  # signature.json when the bundle is signed (checked against a key if set)
    member_heads: list[nn.Module] = field(default_factory=list, repr=False)  # the further members' heads, in order

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
        """The model's identity, as feedback records and exports name it: the bundle digest."""
        return self.digest

    @property
    def backbone(self) -> Backbone:
        """The (first member's) frozen backbone, rebuilt from the bundle's own weights (no hub, no pickle)."""
        return self.members[0].backbone

    @cached_property
    def members(self) -> list[BundleMember]:
        """Every network the bundle averages (one for a single model); the first is the top-level one."""
        infos = self.manifest.ensemble()
        return [BundleMember(self.path, info, head) for info, head in zip(infos, [self.head, *self.member_heads])]

    @property
    def views(self) -> tuple[str, ...]:
        """The test-time views each image is seen through (identity first)."""
        return self.manifest.tta

    @property
    def is_ensemble(self) -> bool:
        return self.manifest.is_ensemble

    # -- side files: written by training, read here only ---------------------------------------------

    def run_config(self) -> dict[str, Any]:
        """The run's config as it was saved (config.json), for retraining the same way."""
        return self._side_json(CONFIG, "the run's config")

    def split_hashes(self) -> dict[str, set[str]]:
        """sha256 of every image in each split the model was built with (splits.json), {} if absent."""
        if SPLITS not in self.manifest.files:
            return {}
        saved = self._side_json(SPLITS, "the splits")
        try:
            return {name: set(hashes) for name, hashes in saved["sha256"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise RetinaLensError(f"{self.path / SPLITS}: cannot read the splits ({type(exc).__name__})") from None

    def curves_file(self) -> Path | None:
        """curves.csv (the training history, hashed at load), or None for a head without epochs."""
        return self.path / CURVES if CURVES in self.manifest.files else None

    def _side_json(self, name: str, what: str) -> dict[str, Any]:
        """A side file, read once and checked against its hash as read (not only at load)."""
        f = self.path / name
        if name not in self.manifest.files:
            raise RetinaLensError(f"{f}: cannot read {what} (the bundle has no {name})")
        try:
            raw = f.read_bytes()
            if hashlib.sha256(raw).hexdigest() != self.manifest.files[name]:
                raise RetinaLensError(f"{self.path}: {name} does not match its hash in the manifest")
            data = json.loads(raw)
        except (OSError, ValueError, RecursionError) as exc:
            raise RetinaLensError(f"{f}: cannot read {what} ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise RetinaLensError(f"{f}: cannot read {what} (not a JSON object)")
        return data


def save_bundle(out: str | Path, *, backbone: Backbone, head: nn.Module, head_config: HeadConfig,
                classes: list[str], precision: str, feature_shape: tuple[int, int, int],
                sections: dict[str, Any], files: dict[str, bytes] | None = None,
                referral: dict[str, str | None] | None = None, task: Task | None = None,
                side_files: Callable[[Path], None] | None = None, sign_key: bytes | None = None) -> Path:
    """Write the bundle into a temp folder beside `out`, then swap it in: never half a bundle.

    `files`: side files by name; `side_files(folder)`: writes more of them into the folder (the training
    curves, drawn from a file); every one is hashed into the manifest before the swap. `sign_key`: also
    write signature.json, the HMAC of the digest with that key."""
    from safetensors.torch import save

    out = Path(out).expanduser()
    check_output_folder(out)
    if out.parent.is_dir():
        _sweep_stale(out.parent)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_folder(out.parent)
    try:
        weights = {"head.safetensors": save({k: v.contiguous() for k, v in head.state_dict().items()},
                                            metadata={CLASSES_KEY: json.dumps(classes)}),
                   "backbone.safetensors": save({k: v.contiguous() for k, v in backbone.model.state_dict().items()})}
        for name, data in (weights | (files or {})).items():
            with writing(out / name):
                (tmp / name).write_bytes(data)
        if side_files is not None:
            side_files(tmp)
        manifest = {
            "format": BUNDLE_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "task": task.name if task else ("oct" if is_oct(classes) else "classes"),
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
            "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())},  # every file: the digest covers all
        }
        document = Manifest.from_dict(manifest, str(out)).to_dict()  # never write a bad one
        with writing(out / MANIFEST):
            atomic_write_bytes(tmp / MANIFEST, canonical_json(document))
        if sign_key is not None:
            with writing(out / SIGNATURE):
                atomic_write_bytes(tmp / SIGNATURE, canonical_json(sign(manifest_digest(document), sign_key)))
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared, like every output
        for f in tmp.iterdir():
            f.chmod(0o644)
        with writing(out):
            _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`, replacing an older bundle there (short temp names: a long
    bundle name plus a suffix could overflow the file-name limit)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = temp_folder(out.parent)
    out.rename(old)  # onto the new empty folder: rename(2) replaces an empty directory
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _sweep_stale(folder: Path) -> None:
    """Temp folders left by a save killed over an hour ago (a young one may be a live writer's)."""
    for stale in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        try:
            if stale.is_dir() and time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass


def is_bundle(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def check_output_folder(out: Path) -> None:
    """A bundle may replace an older bundle, never a file or a folder of anything else."""
    if out.is_file():
        raise RetinaLensError(f"--out {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise RetinaLensError(f"--out {out} is a folder that is not a RetinaLens bundle; give a new or empty folder")
    check_creatable(out, out)


def load_bundle(path: str | Path, key: str | Path | None = None) -> Bundle:
    """Read and verify a bundle: the manifest, every file's hash, nothing unlisted, and the signature
    when a key is configured (`key`, a key file, else $RETINALENS_BUNDLE_KEY). Raises RetinaLensError
    for anything that is not a sound bundle."""
    path = Path(path).expanduser()
    secret = configured_key(key)
    if not (path / MANIFEST).is_file():
        raise RetinaLensError(f"{path}: not a RetinaLens model bundle (no {MANIFEST})")
    try:
        raw = (path / MANIFEST).read_bytes()
    except OSError as exc:
        raise RetinaLensError(f"{path}: unreadable bundle manifest ({exc.strerror or exc})") from None
    document = parse(raw, str(path))
    manifest = Manifest.from_dict(document, str(path))
    digest = manifest_digest(document)
    signature = check_signature(path, digest, secret)  # before the weights are read: a refused bundle costs nothing
    _check_files(path, manifest)
    heads = [load_head(path, member, manifest.classes) for member in manifest.ensemble()]
    return Bundle(path, manifest, heads[0], digest, signature, heads[1:])


def _check_files(path: Path, manifest: Manifest) -> None:
    """Every listed file present with its hash, and no unlisted file that a command would read: weights
    of any name, the side files. Other files (a report written beside the model, a file manager's
    `.DS_Store`) are read by nothing, so they may be there."""
    for name, digest in manifest.files.items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise RetinaLensError(f"{path}: {name} is missing or does not match its hash in the manifest")
    unlisted = sorted(p.name for p in path.iterdir() if p.name not in manifest.files
                      and (p.name in READ or p.suffix in (".safetensors", ".onnx", ".pt", ".pth")))
    if unlisted:
        raise RetinaLensError(f"{path}: {', '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''} is in the "
                              "bundle but not hashed in its manifest (every file must be; bundles written before "
                              "side files were hashed need training again)")
