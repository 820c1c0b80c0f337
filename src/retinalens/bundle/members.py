"""The networks of a bundle, as loaded: a head each (read and checked at load) and a backbone each
(rebuilt from the bundle's own weights on first use: no hub, no pickle).

A bundle has one member (its top-level backbone.safetensors and head.safetensors) or, as an ensemble,
several (manifest.py's `members`); every command reaches them through `Bundle.members`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..data.transforms import Preprocessing
from ..errors import RetinaLensError
from ..models.heads import HeadConfig, create_head
from ..models.registry import Backbone, create_backbone
from .manifest import Member

CLASSES_KEY = "retinalens.classes"  # a head file's metadata: the names of the head's outputs, in order


@dataclass
class BundleMember:
    """One loaded network: `head` (eval), `backbone` (built on first use), and what the manifest says."""

    path: Path  # the bundle folder
    info: Member
    head: nn.Module
    _backbone: Backbone | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.backbone.preprocessing

    @property
    def head_config(self) -> HeadConfig:
        return self.info.head

    @property
    def precision(self) -> str:
        return self.info.precision

    @property
    def temperature(self) -> float | None:
        return self.info.temperature

    @property
    def backbone(self) -> Backbone:
        with self._lock:  # a server's threads build it once
            if self._backbone is None:
                self._backbone = open_backbone(self.path, self.info)
            return self._backbone


def open_backbone(path: Path, member: Member) -> Backbone:
    """The member's frozen backbone from its weights file, checked against the manifest's hash."""
    info = member.backbone
    bb = create_backbone(info.name, weights=path / member.backbone_file)
    if bb.weights_sha256 != info.weights_sha256:
        raise RetinaLensError(f"{path}: {member.backbone_file} does not match the manifest's weights hash")
    if bb.preprocessing != info.preprocessing:
        bb.preprocessing = info.preprocessing  # the bundle's recorded preprocessing wins
    return bb


def load_head(path: Path, member: Member, classes: tuple[str, ...]) -> nn.Module:
    """The member's head, built to the shapes its file holds: a manifest claiming huge sizes is refused
    before any memory is spent (the head is first made on the meta device), and the head's outputs must be
    the manifest's classes in the manifest's order (recorded in the hashed head file)."""
    import torch
    from safetensors import SafetensorError, safe_open

    f = path / member.head_file
    try:
        with safe_open(str(f), framework="pt") as st:
            recorded = (st.metadata() or {}).get(CLASSES_KEY)
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RetinaLensError(f"{path}: head weights do not load ({type(exc).__name__})") from None
    if recorded is None or _json_or_none(recorded) != list(classes):
        raise RetinaLensError(f"{path}: the manifest's classes {list(classes)} are not the head's outputs "
                              f"{recorded or '(not recorded)'}")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in create_head(member.head, member.feature_shape,
                                                            len(classes)).state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in tensors.items()}:
        raise RetinaLensError(f"{path}: head weights do not fit the manifest's head, features and classes")
    head = create_head(member.head, member.feature_shape, len(classes))
    try:
        head.load_state_dict(tensors)
    except RuntimeError as exc:
        raise RetinaLensError(f"{path}: head weights do not load ({type(exc).__name__})") from None
    return head.eval()


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
