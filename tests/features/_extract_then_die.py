"""Helper for test_cache.py (not a test): extract features, then SIGKILL this process part-way.

usage: python _extract_then_die.py CACHE_ROOT MODE N IMAGE...

MODE "after-commit": die right after the N-th chunk is committed (its JSON record written).
MODE "mid-chunk":    die while committing the N-th chunk, after its arrays were written but before
                     its JSON record (the commit) is, leaving orphan arrays and no record.
Exits 3 if it was never killed (the test then fails).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import retinalens.features.cache as cache_mod
from retinalens.data.hashing import sha256_files
from retinalens.features.cache import FeatureCache
from retinalens.features.extract import extract_features, open_cache
from retinalens.models.registry import create_backbone


def main() -> int:
    root, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    paths = [Path(p) for p in sys.argv[4:]]
    backbone = create_backbone()
    cache = open_cache(root, backbone, "fp32")
    calls = {"chunks": 0, "records": 0}

    if mode == "after-commit":
        original = FeatureCache.write_chunk

        def write_chunk(self, *args, **kwargs):
            name = original(self, *args, **kwargs)
            calls["chunks"] += 1
            if calls["chunks"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return name

        FeatureCache.write_chunk = write_chunk
    elif mode == "mid-chunk":
        original_json = cache_mod.atomic_write_json

        def atomic_write_json(path, obj):
            if Path(path).name.startswith("chunk-"):
                calls["records"] += 1
                if calls["records"] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_json(path, obj)

        cache_mod.atomic_write_json = atomic_write_json
    else:
        raise SystemExit(f"unknown mode {mode}")

    extract_features(paths, sha256_files(paths), backbone, cache, batch_size=4, chunk_size=4, workers=0,
                     progress=False)
    return 3


if __name__ == "__main__":
    sys.exit(main())
