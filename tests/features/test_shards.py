"""Sharded extraction (`--shard K/N`): shares that cover every image once, in one cache."""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest

import retinalens._io as io_mod
from retinalens.data.hashing import sha256_files
from retinalens.errors import RetinaLensError
from retinalens.features.cache import CacheKey, FeatureCache
from retinalens.features.extract import open_cache, parse_shard

from helpers import extract_into as extract, records


@pytest.mark.parametrize("text, want", [(None, (0, 1)), ("", (0, 1)), ("0/1", (0, 1)), ("1/3", (1, 3)),
                                        ("2/3", (2, 3)), ("7/8", (7, 8))])
def test_parse_shard(text, want) -> None:
    assert parse_shard(text) == want


@pytest.mark.parametrize("text", ["3/3", "4/3", "-1/3", "1/0", "1", "1/2/3", "a/b", "1 of 3", "/", "1.0/2"])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(RetinaLensError, match="shard"):
        parse_shard(text)


def test_two_shards_into_one_cache_cover_all_once(backbone, images, hashes, expected, tmp_path: Path) -> None:
    paths = images[:8]
    want = sorted(set(sha256_files(paths)))
    # both shards start together (each opens the cache before the other writes), as torchrun ranks do
    a = open_cache(tmp_path, backbone, "fp32")
    b = open_cache(tmp_path, backbone, "fp32")
    ra = extract(paths, backbone, a, shard=(0, 2))
    rb = extract(paths, backbone, b, shard=(1, 2))
    assert ra.n_extracted + rb.n_extracted == len(want) and ra.n_extracted > 0 and rb.n_extracted > 0
    merged = open_cache(tmp_path, backbone, "fp32")
    assert merged.notes == [] and len(merged) == len(want)
    keys = [k for rec in records(merged.dir) for k in rec["keys"]]
    assert sorted(keys) == want  # every image exactly once
    for h in want:
        assert np.allclose(merged.pooled([h])[0], expected[h][1], atol=1e-4)


def test_late_or_rerun_shard_still_covers_its_share(backbone, images, tmp_path: Path) -> None:
    paths = images[:8]
    want = set(sha256_files(paths))
    extract(paths, backbone, open_cache(tmp_path, backbone, "fp32"), shard=(0, 2))
    extract(paths, backbone, open_cache(tmp_path, backbone, "fp32"), shard=(1, 2))  # e.g. a retried rank
    assert set(k for rec in records(open_cache(tmp_path, backbone, "fp32").dir) for k in rec["keys"]) == want


def test_opening_cache_while_another_shard_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = CacheKey("synthetic", "0" * 64, {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}, "fp32", (8, 2, 2))
    writer = FeatureCache(tmp_path, key)
    state = {"opened": False}
    real_replace = os.replace

    def replace(src, dst):
        if not state["opened"] and Path(dst).name.startswith("chunk-"):
            state["opened"] = True
            FeatureCache(tmp_path, key)  # another shard starts while this one has a temp file open
        return real_replace(src, dst)

    proxy = types.SimpleNamespace(**{n: getattr(os, n) for n in ("fdopen", "fsync", "chmod")}, replace=replace)
    monkeypatch.setattr(io_mod, "os", proxy)
    writer.write_chunk(["k1", "k2"], np.ones((2, 8), np.float32), np.ones((2, 2, 2, 8), np.float16))
    assert state["opened"]
    assert len(FeatureCache(tmp_path, key)) == 2
