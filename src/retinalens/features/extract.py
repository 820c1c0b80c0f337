"""Images -> backbone features -> cache, resumably, in sorted chunks.

Work order is the sorted list of missing image hashes, cut into fixed chunks and batches that never
cross a chunk. A run killed after k chunks leaves exactly those k chunks; the rerun's missing list is
the rest, cut the same way, so the final cache is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._console import console, progress_bar
from ..data.images import ImageFiles, check_batching, image_batches
from ..errors import RetinaLensError
from ..models.machine import runtime_settings
from ..models.registry import Backbone
from .cache import CacheKey, FeatureCache, default_cache_root


@dataclass
class ExtractReport:
    n_images: int = 0  # unique images asked for (this shard)
    n_cached: int = 0  # already in the cache
    n_extracted: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.n_extracted / self.seconds if self.seconds > 0 else 0.0


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N): this process extracts the images whose sha256 falls in share K of N."""
    if not shard:
        return 0, 1
    try:
        k, n = (int(x) for x in shard.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        raise RetinaLensError(f"--shard must be K/N with 0 <= K < N, got {shard!r}") from None
    return k, n


def extract_features(paths: list[Path], hashes: list[str], backbone: Backbone, cache: FeatureCache, *,
                     precision: str = "fp32", batch_size: int = 16, chunk_size: int = 256, workers: int = 0,
                     shard: tuple[int, int] = (0, 1), progress: bool = True) -> ExtractReport:
    """Extract features of the images the cache lacks. Bad images are recorded, never fatal."""
    check_batching(batch_size, workers)
    if chunk_size % batch_size:
        chunk_size = max(batch_size, chunk_size // batch_size * batch_size)  # batches must not cross chunks
    first_path = {}
    for p, h in zip(paths, hashes):
        first_path.setdefault(h, p)
    report = ExtractReport(n_images=len(first_path), notes=list(cache.notes))
    report.failures = [(str(first_path[h]), cache.failure(h)) for h in first_path if cache.failure(h)]
    # An image's shard follows from its hash alone, so a late, retried or resumed rank takes
    # exactly its own share whatever the others have committed meanwhile.
    todo = [h for h in cache.missing(first_path) if int(h[:8], 16) % shard[1] == shard[0]]
    report.n_cached = sum(1 for h in first_path if h in cache)
    if not todo:
        return report
    chunks = [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]
    batches = [list(range(c * chunk_size + b, min(c * chunk_size + b + batch_size, c * chunk_size + len(chunk))))
               for c, chunk in enumerate(chunks) for b in range(0, len(chunk), batch_size)]
    loader = image_batches(ImageFiles([first_path[h] for h in todo], backbone.preprocessing), batches, workers)
    c, h, w = cache.key.feature_shape
    start = time.perf_counter()
    with runtime_settings(), progress_bar(len(todo), f"extract {backbone.name}", progress) as advance:
        chunk_no, pooled, spatial, failed = 0, np.empty((chunk_size, c), np.float32), None, {}
        if cache.has_spatial:
            spatial = np.empty((chunk_size, h, w, c), np.float16)
        for x, idx, errors in loader:
            s, p = backbone.encode(x, precision)
            base = chunk_no * chunk_size
            for j, i in enumerate(idx.tolist()):
                pooled[i - base] = p[j].numpy()
                if spatial is not None:
                    spatial[i - base] = s[j].numpy()
                if errors[j]:
                    failed[todo[i]] = errors[j]
            advance(len(idx))
            end = min(base + chunk_size, len(todo))
            if int(idx[-1]) == end - 1:  # chunk complete: commit it
                ok = [k for k in range(end - base) if todo[base + k] not in failed]
                keys = [todo[base + k] for k in ok]
                cache.write_chunk(keys, pooled[ok], spatial[ok] if spatial is not None else None, failed)
                report.n_extracted += len(keys)
                report.failures += [(str(first_path[k]), r) for k, r in failed.items()]
                chunk_no, failed = chunk_no + 1, {}
    report.seconds = time.perf_counter() - start
    return report


def open_cache(root: str | Path | None, backbone: Backbone, precision: str, *, spatial: bool = True,
               on_mismatch: str = "rebuild") -> FeatureCache:
    """The cache for this backbone's features (root: --cache, or $RETINALENS_CACHE, or ~/.cache)."""
    key = CacheKey(backbone.name, backbone.weights_sha256, backbone.preprocessing.to_dict(), precision,
                   backbone.feature_shape())
    return FeatureCache(root if root is not None else default_cache_root(), key, spatial=spatial,
                        on_mismatch=on_mismatch)


def head_inputs(cache: FeatureCache, hashes: list[str], input_kind: str) -> np.ndarray:
    """What a head eats: spatial maps for the conv head, pooled vectors for the pooled head."""
    x = cache.spatial(hashes) if input_kind == "spatial" else cache.pooled(hashes)
    if not np.isfinite(x).all():  # bytes damaged on disk behind a sound header
        raise RetinaLensError(f"the feature cache at {cache.dir} holds non-finite values (damaged on disk); "
                              "delete that folder and run again")
    return x


def print_extract_report(report: ExtractReport) -> None:
    """What extraction did, then every image it could not read (one line each)."""
    say = console()
    for note in report.notes:
        say.print(f"[yellow]{note}[/]")
    if report.n_extracted:
        say.print(f"extracted {report.n_extracted} image(s) at {report.images_per_s:.1f} img/s; "
                  f"{report.n_cached} already cached")
    for path, reason in report.failures:
        say.print(f"[red]skipped[/] {reason}" if path in reason else f"[red]skipped[/] {path}: {reason}")
