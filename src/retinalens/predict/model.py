"""The Python API: `retinalens.load("bundle").predict("scan.jpeg")`.

Prediction runs the bundle's own backbone and head through the same decode -> preprocess ->
Backbone.encode path that built the training features.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .._console import progress_bar
from ..data.images import ImageFiles, check_batching, image_batches
from ..data.decode import decode_image
from ..errors import ImageDecodeError, RetinaLensError
from ..trust.calibration import calibrated, positive_score
from ..trust import NO_GATE, Gate
from ..trust.statistics import SOURCE_STATISTICS, all_statistics, source_statistics
from ..bundle.manifest import Manifest
from ..bundle.network import head_input, tta_view
from ..bundle.members import BundleMember
from ..bundle.store import Bundle, load_bundle
from ..models.heads import head_probabilities
from ..models.machine import usable_cores, runtime_settings
from ..models.registry import Backbone
from .inputs import Input, expand_inputs

BATCH_SIZE = 16  # images per model call in predict_many (and on Ray)
SINGLE_IMAGE_THREADS = 1  # one image on 1 thread: 34 ms median (p95 43 ms) vs 43 ms (p95 123 ms) on 2


class Model:
    """A loaded bundle, ready to predict. Thread-safe for concurrent `predict` calls (read-only)."""

    def __init__(self, bundle: Bundle, runtime: str = "auto", onnx_file: str | Path | None = None,
                 threads: int | None = None) -> None:
        """runtime: torch (the traced backbone at the bundle's precision), onnx (onnxruntime fp32 on the
        bundle's cached ONNX export, or on `onnx_file`), or auto (see retinalens.export.runtime).
        threads: intra-op threads of a call (None: one for `predict`, whose single image gains nothing
        from a second thread but its waits, and torch's default, one per core, for `predict_many`)."""
        if threads is not None and threads < 1:
            raise RetinaLensError(f"threads must be 1 or more, got {threads}")
        self.threads = threads
        from ..export.runtime import open_runtime

        self.bundle = bundle
        self.head = bundle.head.eval()  # the first member's
        self._onnx = open_runtime(bundle, runtime, onnx_file)
        self.runtime = "torch" if self._onnx is None else "onnx"
        self.temperature = bundle.temperature  # None: a bundle from before calibration
        self.gate = Gate.from_bundle(bundle)  # None: a bundle from before the gate (every image passes)
        self.referral_threshold = bundle.manifest.referral_threshold  # None: no threshold fitted

    @property
    def backbone(self) -> Backbone:
        """The PyTorch backbone, built on first use (the onnx runtime does not need it)."""
        return self.bundle.backbone

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 pixels (N, S, S, 3) from Preprocessing.load -> class probabilities (N, K)."""
        return self.probabilities_and_pooled(batch)[0]

    def probabilities_and_pooled(self, batch: torch.Tensor, beside: Executor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 pixels (N, S, S, 3) -> (class probabilities (N, K), calibrated with the bundle's
        temperature, pooled backbone features (N, C) float32). beside: see ensemble_uncalibrated."""
        if self._onnx is not None:  # the exported graph divides the logits by the temperature itself
            return self._onnx.run(batch)
        probs, pooled = self.uncalibrated(batch, beside)
        return calibrated(probs, self.temperature), pooled

    def uncalibrated(self, batch: torch.Tensor, beside: Executor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The probabilities before the bundle's temperature (an ensemble's: the average of its members'
        over its views, each member after its own temperature), and the gate's pooled features: the
        first member's, of the identity view. The traced backbones at the bundle's precision compute
        what bundle/network.py's Ensemble computes eagerly (same views, same order, same average)."""
        return ensemble_uncalibrated(self.bundle.members, self.bundle.views, batch, beside)

    @property
    def measure(self) -> Callable[[Image.Image], list[float]] | None:
        """What the gate reads of each file's full-resolution decode (None: no gate, nothing to read)."""
        return source_statistics if self.gate else None

    def assess(self, batch: torch.Tensor, source: torch.Tensor | np.ndarray | None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """uint8 pixels (N, S, S, 3) and `measure` of their files (N, 3; None without a gate) -> (calibrated
        probabilities (N, K), one gate verdict each): what prediction and explanation both decide on."""
        probs, pooled = self.probabilities_and_pooled(batch)
        if self.gate is None:
            return probs, [{**NO_GATE, "scores": {}} for _ in range(len(batch))]
        return probs, self.gate.check(batch, pooled, source)

    def decoding(self) -> dict[str, Any]:
        """How this model's inputs are decoded (ImageFiles' options): with a gate, each file's
        full-resolution statistics (size, 8x8 blocks) come with its pixels."""
        return {"preprocessing": self.bundle.preprocessing, "measure": self.measure, "n_measures": len(SOURCE_STATISTICS)}

    def batch_results(self, x: torch.Tensor, names: Sequence[str], errors: Sequence[str],
                      source: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """One decoded batch (pixels, and `source` statistics when gated) -> one result per image:
        {input, error} for those that did not decode. The one path of every engine."""
        probs, gates = self.assess(x, source)
        return [{"input": n, "error": e} if e else image_result(self.bundle, n, probs[j], gates[j])
                for j, (n, e) in enumerate(zip(names, errors))]

    def predict(self, source: str | Path | bytes) -> dict[str, Any]:
        """One image (path, URL or bytes) -> {input, label, probabilities, referral, p_referral, refer, gate}
        or {input, error}. gate = {ok, reason, scores}: when not ok, label, referral and refer are None."""
        results = self._predict([source], batch_size=BATCH_SIZE, workers=0, progress=False,
                                threads=self.threads or SINGLE_IMAGE_THREADS, spare_core=True)
        if len(results) != 1:
            raise RetinaLensError(f"{source} holds {len(results)} images: use predict_many")
        return results[0]

    def predict_many(self, sources: Sequence[str | Path | bytes], *, batch_size: int = BATCH_SIZE, workers: int = 0,
                     progress: bool = False, threads: int | None = None) -> list[dict[str, Any]]:
        """Many images / folders / URLs. Bad inputs get an `error` entry; the rest still complete.
        threads: intra-op threads for this call (default: the Model's, else torch's), restored after."""
        return self._predict(sources, batch_size=batch_size, workers=workers, progress=progress, threads=threads,
                             spare_core=False)

    def _predict(self, sources: Sequence[str | Path | bytes], *, batch_size: int, workers: int, progress: bool,
                 threads: int | None, spare_core: bool) -> list[dict[str, Any]]:
        """predict_many; `spare_core`: the caller (`predict`, decoding in this thread) leaves the other cores
        idle, unlike the web server's or Ray's calls, which fill every core themselves, so a lone gated
        image may use one (`_alone`)."""
        check_batching(batch_size, workers)
        inputs = expand_inputs(list(sources))
        results: list[dict[str, Any] | None] = [{"input": i.name, "error": i.error} if i.error else None for i in inputs]
        good: list[tuple[int, Input]] = [(k, i) for k, i in enumerate(inputs) if not i.error]
        if not good:
            return [r for r in results if r is not None]
        with runtime_settings(threads or self.threads), progress_bar(len(good), "predict", progress) as advance:
            if spare_core and len(good) == 1 and self.gate is not None and torch.get_num_threads() < usable_cores():
                results[good[0][0]] = self._alone(good[0][1])
                advance(1)
                return [r for r in results if r is not None]
            dataset = ImageFiles([i.item for _, i in good], names=[i.name for _, i in good], **self.decoding())
            order = list(range(len(good)))
            for x, idx, errors, *source in image_batches(
                    dataset, [order[i:i + batch_size] for i in range(0, len(order), batch_size)], workers):
                names = [good[i][1].name for i in idx.tolist()]
                for i, r in zip(idx.tolist(), self.batch_results(x, names, errors, *source)):
                    results[good[i][0]] = r
                advance(len(idx))
        return [r for r in results if r is not None]

    def _alone(self, item: Input) -> dict[str, Any]:
        """One gated image while a core is idle (`predict`): what ImageFiles and `assess` compute for it
        (decode_image, Preprocessing.pixels, the network, the gate), with the gate's file and image
        statistics on a second thread while this one resizes and runs the network (numpy, Pillow and
        the traced graph release the GIL): a batch decoded ahead hides the file statistics, a lone
        image would wait for them. An ensemble's first member runs on that thread too, after the
        statistics (the two-view default: the statistics and the squash's network, 7.0 + 7.4 ms on one
        thread of the development Xeon, beside the band's, 20.0 ms, on this one). Only where the core
        is really idle: two one-thread calls side by side (the web server's) each with a second
        thread ran 22% fewer images/s (measured)."""
        try:
            img = decode_image(item.item, name=item.name, keep_grey=True, concurrent=True)  # type: ignore[arg-type]
        except ImageDecodeError as exc:
            return {"input": item.name, "error": str(exc)}
        pixels: Future[torch.Tensor] = Future()

        def statistics() -> dict[str, np.ndarray]:
            source = torch.tensor([self.measure(img)], dtype=torch.float64)  # type: ignore[misc]  (gated)
            return all_statistics(pixels.result(), source)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retinalens-gate") as beside:
            stats = beside.submit(statistics)
            try:
                x = self.bundle.preprocessing.pixels(img)[None]
            except BaseException as exc:  # the statistics thread must not wait for pixels that never come
                pixels.set_exception(exc)
                raise
            pixels.set_result(x)
            probs, pooled = self.probabilities_and_pooled(x, beside)
            [gate] = self.gate.check(x, pooled, statistics=stats.result())  # type: ignore[union-attr]
        return image_result(self.bundle, item.name, probs[0], gate)


def image_result(bundle: Bundle, name: str, probs: np.ndarray, gate: dict[str, Any]) -> dict[str, Any]:
    """One image's result from its calibrated probabilities and gate verdict (prediction's, and an
    evaluation's B-scans when it answers per volume). An ungradable image (gate not ok) keeps its
    probabilities but gets no label, level or decision."""
    classes, positives, threshold = bundle.classes, bundle.positive_classes, bundle.manifest.referral_threshold
    label = classes[int(np.argmax(probs))] if gate["ok"] else None
    p_ref = float(positive_score(probs[None], classes, positives)[0]) if positives else None
    refer = None
    if gate["ok"] and threshold is not None and p_ref is not None:
        refer = p_ref >= threshold.threshold
    return {"input": name, "label": label, "probabilities": {c: float(p) for c, p in zip(classes, probs)},
            "referral": bundle.manifest.level(label), "p_referral": p_ref, "refer": refer, "gate": gate}


def ensemble_uncalibrated(members: Sequence[BundleMember], views: Sequence[str], batch: torch.Tensor,
                          beside: Executor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Members x views on uint8 pixels -> (the mean of the members' probabilities, each after its own
    temperature, (N, K) float64; the first member's pooled identity-view features (N, C) float32).
    beside: an executor on an idle core that runs each view's first member while this thread runs the
    others (`Model._alone`); the same numbers, averaged in the same order."""
    outs: list[tuple[np.ndarray, torch.Tensor]] = []
    for view in views:
        x = tta_view(view, batch)
        ahead = beside.submit(_member_output, members[0], x) if beside is not None and len(members) > 1 else None
        rest = [_member_output(m, x) for m in members[0 if ahead is None else 1:]]
        outs += ([] if ahead is None else [ahead.result()]) + rest
    probs = [p for p, _ in outs]
    return (probs[0] if len(probs) == 1 else np.mean(probs, axis=0)), outs[0][1].numpy()


def _member_output(m: BundleMember, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """One member on one view's pixels -> (its probabilities after its own temperature, its pooled features)."""
    spatial, pooled = m.backbone.encode(x, m.precision)
    return calibrated(head_probabilities(m.head, head_input(m.head_config, spatial, pooled)), m.temperature), pooled


def load(path: str | Path, runtime: str = "auto", onnx_file: str | Path | None = None,
         threads: int | None = None) -> Model:
    """Load a model bundle (verified against its manifest's hashes); runtime: auto | torch | onnx;
    threads: see Model."""
    return Model(load_bundle(path), runtime, onnx_file, threads)
