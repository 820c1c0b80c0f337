"""Images -> backbone features -> cache, resumably, in sorted chunks.

Work order is the sorted list of missing image hashes, cut into fixed chunks and batches that never
cross a chunk (plan_extraction); ChunkWriter commits each chunk once all its images are in. A run
killed after k chunks leaves exactly those k chunks, whichever they were (the local loop commits
them in order, Ray in any order): each is a whole chunk of the plan, all full but the last, so the
rerun's missing list is the rest cut the same way, and the final cache is bit-identical to an
uninterrupted run.
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
    startup_s: float = 0.0  # until the first batch's features were in: model build and trace (Ray: actor start)
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


@dataclass
class ExtractPlan:
    """The work of one extraction: what is missing, cut into chunks and batches.

    `todo` is the sorted list of missing hashes (this shard's); chunk c is todo[c*chunk_size:...];
    each batch is a list of indices into `todo` that never crosses a chunk. Every engine (the local
    loop, Ray) runs exactly these batches, so the pixels of every backbone call, and so the features,
    are the same whichever engine ran them."""

    todo: list[str]
    paths: list[Path]  # the file of each todo hash
    chunk_size: int
    batches: list[list[int]]
    report: ExtractReport


def plan_extraction(paths: list[Path], hashes: list[str], cache: FeatureCache, *, batch_size: int,
                    chunk_size: int, shard: tuple[int, int] = (0, 1)) -> ExtractPlan:
    """What `cache` lacks of these images, in work order, with what is known already in the report."""
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
    batches = [list(range(start + b, min(start + b + batch_size, start + len(chunk))))
               for start in range(0, len(todo), chunk_size)
               for chunk in [todo[start:start + chunk_size]] for b in range(0, len(chunk), batch_size)]
    return ExtractPlan(todo, [first_path[h] for h in todo], chunk_size, batches, report)


class ChunkWriter:
    """Collects the features of a plan's batches, in any order, and commits each chunk through
    FeatureCache.write_chunk as soon as all of its images are in. A batch given twice (a retried
    task) is taken once."""

    def __init__(self, plan: ExtractPlan, cache: FeatureCache) -> None:
        self.plan, self.cache = plan, cache
        # chunk number -> (pooled, spatial, failed {sha256: reason}, indices in)
        self._open: dict[int, tuple[np.ndarray, np.ndarray | None, dict[str, str], set[int]]] = {}
        self._seen: set[int] = set()  # first index of every batch taken

    def add(self, idx: list[int], pooled: np.ndarray, spatial: np.ndarray | None, errors: list[str]) -> int:
        """One batch's results (rows in the order of `idx`); returns how many images were new."""
        if not idx or idx[0] in self._seen:
            return 0
        self._seen.add(idx[0])
        plan, (c, h, w) = self.plan, self.cache.key.feature_shape
        chunk_no = idx[0] // plan.chunk_size
        base, end = chunk_no * plan.chunk_size, min((chunk_no + 1) * plan.chunk_size, len(plan.todo))
        if chunk_no not in self._open:
            buf = np.empty((end - base, h, w, c), np.float16) if self.cache.has_spatial else None
            self._open[chunk_no] = (np.empty((end - base, c), np.float32), buf, {}, set())
        p_buf, s_buf, failed, done = self._open[chunk_no]
        for j, i in enumerate(idx):
            p_buf[i - base] = pooled[j]
            if s_buf is not None:
                s_buf[i - base] = spatial[j]
            if errors[j]:
                failed[plan.todo[i]] = errors[j]
            done.add(i)
        if len(done) == end - base:  # chunk complete: commit it
            del self._open[chunk_no]
            ok = [k for k in range(end - base) if plan.todo[base + k] not in failed]
            keys = [plan.todo[base + k] for k in ok]
            self.cache.write_chunk(keys, p_buf[ok], s_buf[ok] if s_buf is not None else None, failed)
            plan.report.n_extracted += len(keys)
            plan.report.failures += [(str(plan.paths[i]), failed[plan.todo[i]]) for i in range(base, end)
                                     if plan.todo[i] in failed]
        return len(idx)


def extract_features(paths: list[Path], hashes: list[str], backbone: Backbone, cache: FeatureCache, *,
                     precision: str = "fp32", batch_size: int = 16, chunk_size: int = 256, workers: int = 0,
                     shard: tuple[int, int] = (0, 1), progress: bool = True) -> ExtractReport:
    """Extract features of the images the cache lacks. Bad images are recorded, never fatal."""
    check_batching(batch_size, workers)
    plan = plan_extraction(paths, hashes, cache, batch_size=batch_size, chunk_size=chunk_size, shard=shard)
    if not plan.todo:
        return plan.report
    loader = image_batches(ImageFiles(plan.paths, backbone.preprocessing), plan.batches, workers)
    writer = ChunkWriter(plan, cache)
    start = time.perf_counter()
    with runtime_settings(), progress_bar(len(plan.todo), f"extract {backbone.name}", progress) as advance:
        for x, idx, errors in loader:
            s, p = backbone.encode(x, precision)
            advance(writer.add(idx.tolist(), p.numpy(), s.numpy() if cache.has_spatial else None, list(errors)))
            plan.report.startup_s = plan.report.startup_s or time.perf_counter() - start
    plan.report.seconds = time.perf_counter() - start
    return plan.report


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
