"""What the web app does, without the web: one loaded model, the feedback store, heat maps.

One `Service` per process holds the one `Model` (loaded once, shared by every request: prediction is
read-only and thread-safe) and the feedback store. Grad-CAM hooks and backpropagates through the
backbone, which is not thread-safe, so heat maps are made one at a time under a lock.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageDecodeError, RetinaLensError
from ..bundle.card import model_card
from ..models.machine import usable_cores
from ..feedback.store import FeedbackStore, ModelVersion, UnknownAnalysis
from .security import LOOPBACK_NAMES, host_name, is_loopback
from .uploads import ImageTooLarge, display_name, sniff_image, without_metadata

HEATMAP_SIDE = 1024  # a fundus photo's full-size overlay would be megabytes of PNG for a page that shows ~500 px
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
MIN_TOKEN = 16  # characters: a token short enough to guess is no protection


@dataclass
class ServeConfig:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000
    db: str | None = None  # SQLAlchemy URL or SQLite file path; None: default_db()
    images: Path | None = None  # feedback images; None: `images/` beside an SQLite file
    max_upload_mb: float = 20.0  # per request, all files together
    threads: int = 0  # model calls at a time, each on a batch of queued images; 0: one per core (see model_threads)
    max_batch: int = 4  # images per model call: on one core a scan costs the same in batches of 4 and 8 (more
                        # in 16), and a smaller batch is answered sooner (benchmarks/bench_serve.py measures both)
    max_files: int = 32  # per request
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides --host and the loopback names
    token: str | None = None  # API token; required when --host is reachable from other machines
    keep_originals: bool = False  # also keep each upload verbatim (with its metadata) in originals/

    def __post_init__(self) -> None:
        if not self.max_upload_mb > 0:
            raise RetinaLensError(f"--max-upload-mb must be positive (got {self.max_upload_mb})")
        if self.threads < 0:
            raise RetinaLensError(f"--workers-threads must be 0 (one per core) or more (got {self.threads})")
        if self.max_batch < 1:
            raise RetinaLensError(f"--max-batch must be at least 1 (got {self.max_batch})")
        if not 0 <= self.port <= 65535:
            raise RetinaLensError(f"--port must be 0-65535 (got {self.port})")
        if self.log_level not in LOG_LEVELS:
            raise RetinaLensError(f"--log-level must be one of {', '.join(LOG_LEVELS)} (got {self.log_level!r})")
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise RetinaLensError(f"--token must be at least {MIN_TOKEN} characters (e.g. python -c "
                                  "'import secrets; print(secrets.token_urlsafe())')")
        if not self.token and not is_loopback(self.host):
            raise RetinaLensError(f"--host {self.host} is reachable from other machines: set an API token "
                                  "(--token or RETINALENS_TOKEN)")

    @property
    def host_names(self) -> set[str]:
        """The Host header names this server answers for."""
        return {host_name(h) for h in (self.host, *LOOPBACK_NAMES, *self.allowed_hosts)}

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def model_calls(self) -> int:
        return self.threads or usable_cores()

    @property
    def model_threads(self) -> int:
        """Intra-op threads for each model call: the cores shared among the calls. One call per core,
        each single-threaded, beats one call on every core for a server: OpenMP's spinning workers
        then never compete with decoding, HTTP and the other call (measured in the README)."""
        return max(1, usable_cores() // self.model_calls)


@dataclass
class Upload:
    index: int  # position in the request
    name: str  # the client's file name, for display only
    data: bytes
    extension: str = ""  # from the sniffed format
    error: str = ""


def default_db() -> Path:
    """$XDG_DATA_HOME/retinalens/feedback/feedback.db (default ~/.local/share/...)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "retinalens" / "feedback" / "feedback.db"


def jsonable(obj: Any) -> Any:
    """Results -> plain JSON (numpy scalars to numbers, NaN to null), for responses and the database."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def shown(pred: dict[str, Any]) -> dict[str, Any]:
    """A prediction as the API answers it. The probabilities of an image the quality gate refused are no
    triage result, so they travel only as `probabilities_unvalidated`, and `probabilities` and `p_referral`
    are null: no client can show them as if valid. (The store keeps them as made, for the records.)"""
    if (pred.get("gate") or {}).get("ok", True):
        return pred
    return pred | {"probabilities": None, "p_referral": None, "probabilities_unvalidated": pred["probabilities"]}


class Service:
    def __init__(self, cfg: ServeConfig) -> None:
        from ..predict.model import load

        self.cfg = cfg
        self.store = FeedbackStore(cfg.db or default_db(), cfg.images)  # first: a bad --db fails in a second
        try:
            self.model = load(cfg.bundle)  # the one model of this process
        except BaseException:
            self.store.close()
            raise
        self.version = ModelVersion.of_bundle(self.model.bundle)
        self._cam_lock = threading.Lock()
        self._explainer: Any = None  # retinalens.explain.Explainer, made on the first heat map

    # -- prediction --------------------------------------------------------------------------------

    def sniff(self, files: list[tuple[str | None, bytes]]) -> list[Upload]:
        """Client files (name, bytes) -> uploads, each with its real format or the reason it is refused."""
        uploads = []
        for i, (filename, data) in enumerate(files):
            upload = Upload(i, display_name(filename, i), data)
            try:
                upload.extension = sniff_image(data)
            except ImageTooLarge as exc:  # a bomb refuses the whole request (413): it is an attack, not a scan
                raise ImageTooLarge(f"{upload.name}: {exc}") from None
            except ImageDecodeError as exc:
                upload.error = str(exc)
            uploads.append(upload)
        return uploads

    def predict(self, images: list[bytes]) -> list[dict[str, Any]]:
        """The model on sniffed images (a batch, possibly from several requests): one result each."""
        return self.model.predict_many(images) if images else []

    def record(self, uploads: list[Upload], predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store each analysed image and its prediction; one result per upload (errors per file)."""
        results = []
        good = iter(predictions)
        for upload in uploads:
            result: dict[str, Any] = {"index": upload.index, "name": upload.name}
            pred = {"error": upload.error} if upload.error else next(good)
            if "error" in pred:  # the decoder's message names the input "image", never the client's name
                results.append(result | {"error": str(pred["error"])})
                continue
            pred = jsonable({k: v for k, v in pred.items() if k != "input"})
            original = (upload.data, upload.extension) if self.cfg.keep_originals else None
            stored, extension = without_metadata(upload.data, upload.extension)
            analysis_id = self.store.add_analysis(stored, extension, pred, self.version, original=original,
                                                  upload_sha256=hashlib.sha256(upload.data).hexdigest())
            results.append(result | {"id": analysis_id, **shown(pred), "heatmap": f"/api/analyses/{analysis_id}/heatmap.png"})
        return results

    def heatmap_png(self, analysis_id: str) -> bytes:
        """The Grad-CAM overlay of an analysed image for its predicted class (for the most likely one
        when the quality gate refused a label), at most HEATMAP_SIDE pixels a side."""
        record = self.analysis(analysis_id)
        data = self.store.read_image(record)
        # A database kept across models may hold a label this model does not have: explain its own best then.
        target = record["predicted"] if record["predicted"] in self.model.classes else None
        with self._cam_lock:  # one at a time: the explainer's hooks keep per-call state
            if self._explainer is None:  # its fp32 copy of the network is made once, on first use
                from ..explain import Explainer

                self._explainer = Explainer(self.model).__enter__()
            # gated=False: the analysis, ungradable or not, is on record with its verdict, and its heat map
            # is asked for by id (the page shows none for an ungradable image).
            explanation = next(iter(self._explainer.explain_many([data], target, max_side=HEATMAP_SIDE, gated=False)))
        if isinstance(explanation, dict):  # cannot happen for a stored image that was analysed; say so if it does
            raise RetinaLensError(f"analysis {analysis_id}: {explanation['error']}")
        return explanation.overlay_png()

    # -- records -----------------------------------------------------------------------------------

    def analysis(self, analysis_id: str) -> dict[str, Any]:
        record = self.store.analysis(analysis_id)
        if record is None:
            raise UnknownAnalysis(f"no analysis with id {analysis_id!r}")
        return record

    def feedback(self, analysis_id: str, label: str) -> dict[str, Any]:
        return self.store.add_feedback(analysis_id, label)

    # -- the model card ----------------------------------------------------------------------------

    def model_card(self) -> dict[str, Any]:
        """The bundle's model card (bundle/card.py: no local paths, no run config), its version, and the
        upload limits the page checks before sending."""
        return jsonable(model_card(self.model.manifest.to_dict()) | {
            "name": self.model.bundle.path.name,
            "version": {"manifest_sha256": self.version.sha256, "created": self.version.created},
            "limits": {"max_upload_bytes": self.cfg.max_upload_bytes, "max_files": self.cfg.max_files},
        })

    def close(self) -> None:
        with self._cam_lock:
            if self._explainer is not None:
                self._explainer.close()
                self._explainer = None
        self.store.close()
