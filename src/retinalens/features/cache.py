"""Content-addressed, memory-mapped feature cache.

One folder per (backbone, weights hash, preprocessing, precision). Features are appended in chunks;
each chunk is two .npy files (spatial maps float16 channels-last, pooled vectors float32) and a JSON
commit record listing the image sha256s, written last. Every file goes to a temp name and is renamed
into place, so a process killed at any point leaves only whole chunks (and temp files, which the next
open deletes). Chunks are independent, so shards (torchrun ranks, Ray tasks) can write side by side.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .._io import atomic_save_npy, atomic_write_json, sweep_temp_files
from ..errors import RetinaLensError

CACHE_FORMAT = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CacheKey:
    """What makes features comparable: same backbone weights, same pixels in, same arithmetic."""

    backbone: str
    weights_sha256: str
    preprocessing: dict[str, Any]
    precision: str
    feature_shape: tuple[int, int, int]  # (C, H, W)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists: compares equal to what JSON reads back

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def default_cache_root() -> Path:
    return Path(os.environ.get("RETINALENS_CACHE", Path.home() / ".cache" / "retinalens" / "features"))


class FeatureCache:
    """Open (creating or rebuilding as needed) the cache for `key` under `root`.

    `root` is either a cache root (a sub-folder per key is used) or one cache folder (it holds a
    manifest). A folder whose manifest does not match `key` is stale: with `on_mismatch="rebuild"`
    it is emptied and rebuilt, with `"error"` a RetinaLensError says so.
    """

    def __init__(self, root: str | Path, key: CacheKey, *, spatial: bool = True, on_mismatch: str = "rebuild") -> None:
        root = Path(root).expanduser()
        self.key = key
        # Whether chunks carry spatial maps. A folder that has them keeps them (pooled-only readers
        # use the same folder); one without them is rebuilt when maps are asked for.
        self.has_spatial = spatial
        self.notes: list[str] = []  # what opening the cache had to fix, for the user
        keyed = f"{key.backbone}-{key.digest[:12]}"
        if _is_cache_folder(root) and root.name != keyed and _manifest_key(root) not in (None, key.to_dict()):
            # --cache named one cache folder, built for other features. `extract`/`train` go next
            # to it (never wiping features somebody built on purpose); `evaluate` refuses.
            if on_mismatch == "error":
                raise RetinaLensError(f"the feature cache at {root} holds {_difference(_manifest_key(root), key)}; "
                                      "pass another --cache folder")
            self.notes.append(f"{root} holds {_difference(_manifest_key(root), key)}; using {root.parent / keyed}")
            root = root.parent
        self.dir = root if _is_cache_folder(root) else root / keyed
        self._index: dict[str, tuple[int, int]] = {}
        self._failed: dict[str, str] = {}  # images that cannot be decoded: sha256 -> reason
        self._chunks: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        self._open(on_mismatch)

    # -- opening -------------------------------------------------------------------------------
    def _open(self, on_mismatch: str) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RetinaLensError(f"cannot create feature cache folder {self.dir}: {exc.strerror}") from None
        want = {"format": CACHE_FORMAT, "key": self.key.to_dict()}
        manifest_path = self.dir / MANIFEST
        if manifest_path.is_file():
            try:
                have = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError):
                have = None
            stale = not have or {k: have.get(k) for k in want} != want
            described = _describe(have)
            if not stale and self.has_spatial and not have.get("spatial", True):
                stale, described = True, "pooled vectors only, and spatial maps are needed"
            if stale:
                if on_mismatch == "error":
                    raise RetinaLensError(
                        f"the feature cache at {self.dir} holds {described}, not features of backbone "
                        f"{self.key.backbone} (weights {self.key.weights_sha256[:12]}): pass another --cache folder")
                self.notes.append(f"feature cache {self.dir} was stale ({described}); rebuilt")
                self._clear()
            else:
                self.has_spatial = bool(have.get("spatial", True))
        sweep_temp_files(self.dir)
        atomic_write_json(manifest_path, {**want, "spatial": self.has_spatial, "created_by": "retinalens"})
        for record in sorted(self.dir.glob("chunk-*.json")):
            self._adopt(record)

    def _clear(self) -> None:
        """Delete what this cache wrote, and nothing else that may share the folder."""
        for p in [*self.dir.glob("chunk-*"), *self.dir.glob(".*.tmp"), self.dir / MANIFEST]:
            p.unlink(missing_ok=True)

    def _adopt(self, record: Path) -> None:
        """Map a committed chunk; a chunk that fails any check is deleted and will be re-extracted."""
        name = record.name[: -len(".json")]
        try:
            meta = json.loads(record.read_text())
            keys = meta["keys"]
            pooled = np.load(self.dir / f"{name}.pooled.npy", mmap_mode="r", allow_pickle=False)
            c, h, w = self.key.feature_shape
            ok = pooled.shape == (len(keys), c) and pooled.dtype == np.float32
            spatial = None
            if self.has_spatial:
                spatial = np.load(self.dir / f"{name}.spatial.npy", mmap_mode="r", allow_pickle=False)
                ok = ok and spatial.shape == (len(keys), h, w, c) and spatial.dtype == np.float16
            if not ok:
                raise ValueError("shape or dtype mismatch")
        except (OSError, EOFError, ValueError, KeyError, json.JSONDecodeError) as exc:
            self.notes.append(f"dropped corrupt chunk {name} ({type(exc).__name__}); it will be re-extracted")
            for p in self.dir.glob(f"{name}.*"):
                p.unlink(missing_ok=True)
            return
        i = len(self._chunks)
        self._chunks.append((name, pooled, spatial))
        for row, k in enumerate(keys):
            self._index.setdefault(k, (i, row))
        # A file's bytes fix whether it decodes, so a failure is as cacheable as features are.
        self._failed.update(meta.get("failed", {}))

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sha: str) -> bool:
        return sha in self._index

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """Hashes neither in the cache nor known to fail, unique and sorted (extraction order)."""
        return sorted({h for h in hashes if h not in self._index and h not in self._failed})

    def failure(self, sha: str) -> str:
        """Why the image with this hash could not be decoded ('' if it could, or is unknown)."""
        return "" if sha in self._index else self._failed.get(sha, "")

    def _gather(self, hashes: list[str], which: int) -> np.ndarray:
        absent = [h for h in hashes if h not in self._index]
        if absent:
            raise KeyError(f"{len(absent)} image(s) not in the feature cache, e.g. {absent[0][:12]}")
        arrays = [self._chunks[self._index[h][0]][which] for h in hashes]
        if arrays and arrays[0] is None:
            raise RetinaLensError(f"the feature cache at {self.dir} has no spatial maps (extracted with --no-spatial)")
        return np.stack([a[self._index[h][1]] for a, h in zip(arrays, hashes)]) if hashes else np.empty((0,))

    def pooled(self, hashes: list[str]) -> np.ndarray:
        """(N, C) float32 pooled vectors, in the order of `hashes`."""
        return self._gather(hashes, 1)

    def spatial(self, hashes: list[str]) -> np.ndarray:
        """(N, H, W, C) float16 channels-last feature maps, in the order of `hashes`."""
        return self._gather(hashes, 2)

    # -- writing -------------------------------------------------------------------------------
    def write_chunk(self, keys: list[str], pooled: np.ndarray, spatial: np.ndarray | None,
                    failed: dict[str, str] | None = None) -> str:
        """Commit one chunk atomically: arrays first, the JSON record (the commit) last."""
        failed = failed or {}
        name = "chunk-" + hashlib.sha256("".join(keys + sorted(failed)).encode()).hexdigest()[:16]
        pooled = np.ascontiguousarray(pooled, dtype=np.float32)
        atomic_save_npy(self.dir / f"{name}.pooled.npy", pooled)
        if self.has_spatial:
            assert spatial is not None
            atomic_save_npy(self.dir / f"{name}.spatial.npy", np.ascontiguousarray(spatial, dtype=np.float16))
        atomic_write_json(self.dir / f"{name}.json", {"keys": keys, "n": len(keys), "failed": failed})
        self._adopt(self.dir / f"{name}.json")
        return name


def _is_cache_folder(folder: Path) -> bool:
    """A folder whose manifest RetinaLens wrote, or (manifest damaged) that holds our chunks.
    Any other folder with a manifest.json is not ours and is used as a root, never emptied."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("created_by") == "retinalens"
    except (OSError, ValueError, AttributeError):
        return (folder / MANIFEST).is_file() and any(folder.glob("chunk-*.json"))


def _manifest_key(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _difference(have: dict[str, Any] | None, want: CacheKey) -> str:
    """'features of X with precision fp32, not bf16': just what differs."""
    if not have:
        return "an unreadable manifest"
    diffs = [f"{k} {_short(have.get(k))}, not {_short(v)}" for k, v in want.to_dict().items() if have.get(k) != v]
    return f"features of {have.get('backbone')} with " + "; ".join(diffs)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text[:12] if len(text) == 64 else text  # a sha256: its first 12 characters


def _describe(record: dict[str, Any] | None) -> str:
    """A cache folder's own record (its manifest.json, not a bundle's) in words."""
    if not record or "key" not in record:
        return "an unreadable or foreign manifest"
    k = record["key"]
    return (f"features of backbone {k.get('backbone')} (weights {str(k.get('weights_sha256'))[:12]}, "
            f"{k.get('preprocessing', {}).get('size')} px, {k.get('precision')})")
