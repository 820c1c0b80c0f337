"""The backbone's traced and frozen graph, built once per machine and kept on disk.

Tracing and freezing a backbone took 2.5 s on a quiet machine and 20-30 s on a loaded one, in every
process, on its first image; loading the saved graph took 0.3 s (EfficientNet-Lite0 fp32, measured
under load: 13.7 s to trace and freeze, 0.33 s to load) and gives bit-identical features.

One entry per backbone weights, preprocessing, precision, torch version and CPU (model and flags:
freezing folds in oneDNN choices of this machine): `$RETINALENS_CACHE/traced/<key>/graph.pt`, else
`~/.cache/retinalens/traced/...`, with a sidecar holding the file's sha256, written last.

Why loading it is acceptable: a TorchScript file holds TorchScript code and tensors, not Python
pickles, and `torch.jit.load` runs no Python from it; it comes from the user's own cache folder, which
is as trusted as the installed package; it is used only when its hash matches the sidecar and its
features match the eager network's on a probe image. Anything else (absent, torn, corrupt, stale,
unreadable by this torch) is rebuilt, never an error; an unwritable cache only means tracing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .._io import atomic_write_bytes, atomic_write_json, prune_entries, user_cache_dir
from .machine import cpu_info

TRACE_FORMAT = 1
CACHE_ENTRIES = 8  # graphs kept (7-90 MB each), least recently used go
MIN_AGREEMENT = 0.99  # cosine similarity of a loaded graph's features to the eager network's


def trace_key(identity: dict[str, Any], precision: str) -> str:
    """Content address of a graph: what it computes (`identity`: backbone, weights sha256,
    preprocessing), its precision, and the torch and CPU it was frozen for."""
    info = cpu_info()
    text = json.dumps([TRACE_FORMAT, identity, precision, torch.__version__, info.model, sorted(info.flags)],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _agrees(graph: torch.jit.ScriptModule, reference: Callable[[torch.Tensor], torch.Tensor],
            probe: torch.Tensor) -> bool:
    with torch.inference_mode():
        a, b = graph(probe).float().flatten(), reference(probe).float().flatten()
    return a.shape == b.shape and bool(torch.nn.functional.cosine_similarity(a, b, dim=0) >= MIN_AGREEMENT)


def _load(path: Path) -> torch.jit.ScriptModule | None:
    """The saved graph when its sidecar (written last) names this file's exact bytes, else None."""
    try:
        data = path.read_bytes()
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format") != TRACE_FORMAT or meta.get("sha256") != hashlib.sha256(data).hexdigest():
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation note
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception:  # noqa: BLE001 - a damaged or foreign file is rebuilt, whatever torch raises
        return None


def cached_graph(identity: dict[str, Any], precision: str, build: Callable[[], torch.jit.ScriptModule],
                 reference: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor,
                 root: Path | None = None) -> torch.jit.ScriptModule:
    """The frozen graph from the cache when it is intact and computes what `reference` (the eager
    network, same input) computes on `probe`; else `build()`, saved for the next process."""
    base = root if root is not None else user_cache_dir("traced")
    path = base / trace_key(identity, precision) / "graph.pt"
    graph = _load(path)
    if graph is not None and _agrees(graph, reference, probe):
        os.utime(path.parent)  # most recently used: pruned last
        return graph
    graph = build()
    try:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(graph, buf)
        data = buf.getvalue()
        atomic_write_bytes(path, data)
        atomic_write_json(path.with_suffix(".json"), {"format": TRACE_FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
                                                      "identity": identity, "precision": precision,
                                                      "torch": torch.__version__})
        prune_entries(base, CACHE_ENTRIES)
    except Exception:  # noqa: BLE001 - an unwritable cache (read-only home, full disk) costs a trace next time
        pass
    return graph
