"""Grad-CAM heat maps: where in the image the model found the evidence for a class.

    with Explainer(retinalens.load("bundle")) as ex:
        e = ex.explain("scan.jpeg")              # predicted class; or target_class="DME"
        e.label, e.class_name, e.heatmap         # (H, W) float32 in [0, 1], the image's own size
        open("scan.cam.png", "wb").write(e.overlay_png())

The prediction (label, probabilities) comes from the same path as `Model.predict`; the heat map
from pytorch-grad-cam on an fp32 eager copy of the bundle (see `net.py`). An ensemble's map is the
mean of its members' maps (each already resized by pytorch-grad-cam to the model input, so maps of
backbones with different feature-map sizes average pixel for pixel), on the identity view; a network
that reads one view of the two-view input (`resize="squash+band"`) maps only that view's columns, and
`Preprocessing.place_heatmap` puts each view's part back on the scan pixels it shows. `BaseExplainer` holds
everything but the CAM method, which a subclass picks in `create_cam`, as pytorch-grad-cam's
BaseCAM subclasses pick their channel weights.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.decode import decode_image
from ..data.transforms import resize_heatmap
from ..errors import RetinaLensError
from ..predict.inputs import expand_inputs
from .net import ExplainNet, enable_grad_on_output, target_layer

if TYPE_CHECKING:
    from pytorch_grad_cam.base_cam import BaseCAM
    from typing_extensions import Self

    from ..bundle.store import Bundle
    from ..predict.model import Model

OVERLAY_ALPHA = 0.6  # heat-map opacity where the map is 1; cold regions show the scan untouched


@dataclass
class Explanation:
    """One image's heat map: `heatmap` (H, W) float32 in [0, 1] and `overlay` (RGB) at the image's size."""

    input: str
    label: str  # the predicted class
    class_name: str  # the class the heat map explains (the predicted one unless asked otherwise)
    heatmap: np.ndarray
    overlay: Image.Image
    probabilities: dict[str, float] = field(default_factory=dict)
    image: Image.Image | None = None  # the decoded RGB image the overlay was drawn on

    def overlay_png(self) -> bytes:
        buffer = io.BytesIO()
        self.overlay.save(buffer, format="PNG")
        return buffer.getvalue()


class BaseExplainer:
    """Class-activation heat maps for a model bundle. Subclasses override `create_cam`.

    A context manager: the fp32 copy of the network and its hooks live between `__enter__` and
    `__exit__` (used outside `with`, they are made on first use and freed by `close()`).
    Not thread-safe: one Explainer per thread (the hooks keep per-call state). The Model it wraps
    stays untouched and may keep serving predictions in other threads.
    """

    def __init__(self, model: Model | Bundle) -> None:
        from ..predict.model import Model

        self.model = model if isinstance(model, Model) else Model(model)
        # Per member: (its network copy, the layer Grad-CAM reads, that layer's reshape, the grad hook).
        self._nets: list[tuple[ExplainNet, nn.Module, Callable[[torch.Tensor], torch.Tensor] | None,
                               torch.utils.hooks.RemovableHandle]] = []

    def create_cam(self, net: nn.Module, layers: list[nn.Module],
                   reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None) -> BaseCAM:
        """The pytorch-grad-cam method to run (a BaseCAM, used as a context manager per batch)."""
        raise NotImplementedError

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def __enter__(self) -> Self:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> list[tuple[ExplainNet, nn.Module, Callable[[torch.Tensor], torch.Tensor] | None,
                                  torch.utils.hooks.RemovableHandle]]:
        if not self._nets:
            with torch.inference_mode(False):  # copies made inside a caller's inference mode could not train
                nets = ExplainNet.members(self.model.bundle)
            for net in nets:
                layer, reshape = target_layer(net)
                self._nets.append((net, layer, reshape, enable_grad_on_output(layer)))
        return self._nets

    def close(self) -> None:
        """Remove the hooks and drop the network copies (a later call makes them again)."""
        for *_, hook in self._nets:
            hook.remove()
        self._nets = []

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise RetinaLensError(f"unknown class '{name}': use one of {', '.join(self.classes)}")
        return self.classes.index(name)

    def heatmaps(self, pixels: torch.Tensor, class_indices: list[int] | None = None) -> np.ndarray:
        """uint8 pixels (N, H, W, 3) from Preprocessing.load -> heat maps float32 (N, H, W) in [0, 1] over
        the model input, each for its class in `class_indices` (default: the predicted class)."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        h, w = self.model.bundle.preprocessing.shape
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != (h, w, 3):
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise RetinaLensError(f"heatmaps takes uint8 pixels (N, {h}, {w}, 3), got {got}")
        if len(pixels) == 0:
            return np.zeros((0, h, w), dtype=np.float32)
        if class_indices is None:
            class_indices = np.argmax(self.model.probabilities(pixels), axis=1).tolist()
        if len(class_indices) != len(pixels) or not all(0 <= int(k) < len(self.classes) for k in class_indices):
            raise RetinaLensError(f"need one class index in 0..{len(self.classes) - 1} per image "
                                  f"(got {list(class_indices)} for {len(pixels)} images)")
        targets = [ClassifierOutputTarget(int(k)) for k in class_indices]
        # Each member's map lands on the input columns it reads (its view); where several read a
        # column (every member of an ordinary ensemble reads all), the maps there are averaged.
        total, readers = np.zeros((len(pixels), h, w), dtype=np.float64), np.zeros(w)
        # inference_mode(False): a caller inside torch.inference_mode still gets gradients here.
        with torch.inference_mode(False), torch.enable_grad():
            x = pixels.permute(0, 3, 1, 2).float()
            for net, layer, reshape, _ in self._open():
                maps = None
                a, b = net.columns
                with self.create_cam(net, [layer], reshape) as cam:  # hooks released on exit
                    maps = cam(input_tensor=x[..., a:b], targets=targets)
                if maps is None:  # pytorch-grad-cam's __exit__ swallows an IndexError; never return nothing
                    raise RuntimeError("Grad-CAM produced no heat map")
                total[:, :, a:b] += np.clip(np.nan_to_num(maps, nan=0.0), 0.0, 1.0)
                readers[a:b] += 1
        return (total / np.maximum(readers, 1)).astype(np.float32)

    def explain(self, source: str | Path | bytes, target_class: str | None = None) -> Explanation:
        """One image (path, URL or bytes) -> Explanation. An unreadable image raises RetinaLensError."""
        results = list(self.explain_many([source], target_class))
        if len(results) != 1:
            raise RetinaLensError(f"{source} holds {len(results)} images: use explain_many")
        if isinstance(results[0], dict):
            r = results[0]
            raise RetinaLensError(r.get("error") or f"{r['input']}: ungradable ({r['ungradable']}), not explained")
        return results[0]

    def explain_many(self, sources: Sequence[str | Path | bytes], target_class: str | None = None, *,
                     batch_size: int = 16, max_side: int | None = None,
                     gated: bool = True) -> Iterator[Explanation | dict[str, Any]]:
        """Files, folders, URLs or bytes, in batches, in input order: an Explanation per image,
        {input, error} for one that cannot be read, or {input, ungradable: reason, gate} for one the
        quality gate refuses, as `Model.predict` does (the same verdict: Model.assess), so that no
        damaged or ungradable image gets a class and a heat map (the rest go on). `gated=False`
        explains those too (the web app's heat map of an analysis already recorded as ungradable).
        `max_side` shrinks the image (and its heat map) to at most that many pixels a side."""
        if batch_size < 1:
            raise RetinaLensError(f"need --batch-size >= 1 (got {batch_size})")
        target = None if target_class is None else self.class_index(target_class)
        inputs = expand_inputs(list(sources))
        measure = self.model.measure
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            decoded: list[tuple[str, Image.Image, torch.Tensor, list[float], Image.Image] | dict[str, Any]] = []
            for inp in chunk:
                try:
                    if inp.error:
                        raise RetinaLensError(inp.error)
                    decoded_image = decode_image(inp.item, name=inp.name, keep_grey=True)
                    pixels = self.model.bundle.preprocessing.pixels(decoded_image)
                    measured = list(measure(decoded_image)) if measure else []  # before any thumbnail
                    image = decoded_image.convert("RGB")
                    if max_side:
                        image.thumbnail((max_side, max_side))
                    decoded.append((inp.name, image, pixels, measured, decoded_image))
                except RetinaLensError as exc:
                    decoded.append({"input": inp.name, "error": str(exc)})
            good = [d for d in decoded if not isinstance(d, dict)]
            made: Iterator[Explanation | dict[str, Any]] = iter(())
            if good:
                batch = torch.stack([d[2] for d in good])
                probs, gates = self.model.assess(batch, np.array([d[3] for d in good]) if measure else None)
                keep = [j for j, g in enumerate(gates) if g["ok"] or not gated]
                explained = [int(np.argmax(probs[j])) if target is None else target for j in keep]
                maps = dict(zip(keep, self.heatmaps(batch[keep], explained))) if keep else {}
                chosen = dict(zip(keep, explained))
                made = iter([self._explanation(name, image, maps[j], probs[j], chosen[j], full) if j in maps else
                             {"input": name, "ungradable": gates[j]["reason"], "gate": gates[j]}
                             for j, (name, image, _, _, full) in enumerate(good)])
            for d in decoded:
                yield d if isinstance(d, dict) else next(made)

    def _explanation(self, name: str, image: Image.Image, heat: np.ndarray, probs: np.ndarray,
                     explained: int, decoded: Image.Image) -> Explanation:
        # The input's map onto the decoded image (the two-view input's parts each onto the pixels they
        # show, found from that image), then to the shown image's size (a thumbnail under max_side).
        heatmap = resize_heatmap(self.model.bundle.preprocessing.place_heatmap(heat, decoded), image.size)
        return Explanation(input=name, label=self.classes[int(np.argmax(probs))], class_name=self.classes[explained],
                           heatmap=heatmap, overlay=overlay_heatmap(image, heatmap),
                           probabilities={c: float(p) for c, p in zip(self.classes, probs)}, image=image)


class Explainer(BaseExplainer):
    """Grad-CAM (Selvaraju et al. 2017) on the bundle: `Explainer(model)`, model a Model or a Bundle.

    Not thread-safe: use one Explainer per thread.
    """

    def create_cam(self, net: nn.Module, layers: list[nn.Module],
                   reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None) -> BaseCAM:
        from pytorch_grad_cam import GradCAM

        return GradCAM(model=net, target_layers=layers, reshape_transform=reshape_transform)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The jet-coloured map blended over the RGB image, more opaque where the map is hotter."""
    from matplotlib import colormaps

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colour = colormaps["jet"](heatmap)[..., :3].astype(np.float32) * 255.0
    weight = (alpha * heatmap)[..., None]
    return Image.fromarray(np.rint(rgb * (1.0 - weight) + colour * weight).astype(np.uint8))
