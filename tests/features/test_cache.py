"""Feature cache + extraction: content-addressed, incremental, stale/corrupt-safe, resumable after
kill -9 (bit-identical to an uninterrupted run), failures cached, shards disjoint and complete."""

from __future__ import annotations

import json
import os
import time
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retinalens.data.hashing import sha256_file, sha256_files
from retinalens.errors import RetinaLensError
from retinalens.features.cache import MANIFEST, CacheKey, FeatureCache
from retinalens.features.extract import extract_features, head_inputs, open_cache

from helpers import N, chunk_files, copy_cache, extract_into as extract, records

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_extract_then_die.py")


# -- extraction --------------------------------------------------------------------------------

def test_first_run_report_and_layout(reference, hashes) -> None:
    r = reference.report
    assert (r.n_images, r.n_cached, r.n_extracted, r.failures) == (N, 0, N, [])
    assert len(reference.cache) == N and all(h in reference.cache for h in hashes)
    recs = records(reference.cache.dir)
    assert [rec["n"] for rec in recs] == [4, 4, 4]
    assert sorted(k for rec in recs for k in rec["keys"]) == sorted(hashes)
    # a chunk is two arrays and one record; nothing else besides the manifest
    names = {p.name for p in reference.cache.dir.iterdir()}
    assert len(names) == 1 + 3 * 3 and MANIFEST in names


def test_features_equal_encode_and_retrievable_in_any_order(reference, hashes, expected) -> None:
    cache = reference.cache
    rng = np.random.default_rng(0)
    for order in (hashes, hashes[::-1], list(rng.permutation(hashes)), [hashes[3], hashes[3], hashes[0]]):
        pooled, spatial = cache.pooled(order), cache.spatial(order)
        assert pooled.shape == (len(order), 1280) and pooled.dtype == np.float32
        assert spatial.shape == (len(order), 7, 7, 1280) and spatial.dtype == np.float16
        for row, h in enumerate(order):
            assert np.array_equal(spatial[row], expected[h][0]), h[:12]
            assert np.array_equal(pooled[row], expected[h][1]), h[:12]
    assert np.array_equal(head_inputs(cache, hashes[:2], "pooled"), cache.pooled(hashes[:2]))
    assert np.array_equal(head_inputs(cache, hashes[:2], "spatial"), cache.spatial(hashes[:2]))
    with pytest.raises(KeyError):
        cache.pooled([hashes[0], "0" * 64])


def test_rerun_extracts_nothing(reference, backbone, images, tmp_path: Path) -> None:
    before = chunk_files(reference.cache.dir)
    cache = open_cache(reference.root, backbone, "fp32")
    assert cache.dir == reference.cache.dir and cache.notes == [] and len(cache) == N
    twin = tmp_path / "same-bytes-other-name.jpeg"
    shutil.copy(images[0], twin)  # content-addressed: a copy is the same image
    r = extract([*images, twin], backbone, cache)
    assert (r.n_images, r.n_cached, r.n_extracted, r.failures) == (N, N, 0, [])
    assert chunk_files(reference.cache.dir) == before


def test_incremental_adds_only_new_images(reference, backbone, images, oct_pool, tmp_path: Path) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    before = chunk_files(leaf)
    new = oct_pool[N:N + 3]
    assert len(new) == 3
    cache = FeatureCache(leaf, reference.cache.key)
    r = extract([*images, *new], backbone, cache)
    assert (r.n_images, r.n_cached, r.n_extracted) == (N + 3, N, 3)
    after = chunk_files(leaf)
    assert {k: after[k] for k in before} == before  # existing chunks untouched (mtime and bytes)
    added = sorted(set(after) - set(before))
    assert len(added) == 3 and all(n.startswith(added[0].split(".")[0]) for n in added)  # one new chunk
    new_hashes = sha256_files(new)
    (new_record,) = [a for a in added if a.endswith(".json")]
    assert sorted(json.loads((leaf / new_record).read_text())["keys"]) == sorted(new_hashes)
    # the new images' features are encode() of that one batch of three, in hash order
    order = sorted(new_hashes)
    by_hash = dict(zip(new_hashes, new))
    s, p = backbone.encode(torch.stack([backbone.preprocessing.load(by_hash[h]) for h in order]), "fp32")
    reopened = FeatureCache(leaf, reference.cache.key)
    assert len(reopened) == N + 3
    assert np.array_equal(reopened.pooled(order), p.numpy())
    assert np.array_equal(reopened.spatial(order), s.numpy())


def test_pooled_only_cache(backbone, images, tmp_path: Path) -> None:
    cache = open_cache(tmp_path, backbone, "fp32", spatial=False)
    r = extract(images[:4], backbone, cache)
    assert r.n_extracted == 4
    assert not list(cache.dir.glob("*.spatial.npy"))
    hs = sorted(sha256_files(images[:4]))
    by_hash = dict(zip(sha256_files(images[:4]), images[:4]))
    _, p = backbone.encode(torch.stack([backbone.preprocessing.load(by_hash[h]) for h in hs]), "fp32")
    assert np.array_equal(cache.pooled(hs), p.numpy())
    with pytest.raises(RetinaLensError, match="spatial"):
        cache.spatial(hs)
    # asking for spatial maps later rebuilds the same folder with them, and says so
    upgraded = open_cache(tmp_path, backbone, "fp32", spatial=True)
    assert upgraded.dir == cache.dir and len(upgraded) == 0 and upgraded.has_spatial
    assert any("spatial" in n for n in upgraded.notes)


def test_spatial_cache_serves_pooled_readers(reference, backbone) -> None:
    """A pooled-only reader (a logistic-head bundle) reuses a cache that has maps: nothing re-extracted."""
    cache = open_cache(reference.cache.dir.parent, backbone, "fp32", spatial=False)
    assert cache.dir == reference.cache.dir and cache.has_spatial and len(cache) == N and not cache.notes


# -- stale caches --------------------------------------------------------------------------------

def _other_keys(key: CacheKey) -> list[CacheKey]:
    pp = dict(key.preprocessing)
    return [
        CacheKey(key.backbone, key.weights_sha256, key.preprocessing, "bf16", key.feature_shape),
        CacheKey(key.backbone, key.weights_sha256, pp | {"size": 256}, key.precision, key.feature_shape),
        CacheKey(key.backbone, "f" * 64, key.preprocessing, key.precision, key.feature_shape),
    ]


@pytest.mark.parametrize("which", ["precision", "preprocessing", "weights"])
def test_cache_folder_of_other_features_is_kept_and_a_sibling_used(reference, tmp_path: Path, which: str) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    before = chunk_files(leaf)
    other = _other_keys(reference.cache.key)[["precision", "preprocessing", "weights"].index(which)]
    cache = FeatureCache(leaf, other)  # --cache named that folder itself: it holds another key's features
    assert cache.dir != leaf and cache.dir.parent == leaf.parent and len(cache) == 0
    assert len(cache.notes) == 1 and str(leaf) in cache.notes[0]
    assert {"precision": "precision", "preprocessing": "preprocessing", "weights": "weights_sha256"}[which] in cache.notes[0]
    assert chunk_files(leaf) == before  # features somebody built on purpose are never wiped
    assert json.loads((cache.dir / MANIFEST).read_text())["key"] == other.to_dict()
    again = FeatureCache(cache.dir, other)  # and the new folder is a sound cache for its key
    assert again.notes == [] and again.dir == cache.dir


def test_stale_cache_via_open_cache(reference, backbone, tmp_path: Path) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    cache = open_cache(leaf, backbone, "bf16")
    assert cache.dir != leaf and len(cache) == 0 and any("precision fp32, not bf16" in n for n in cache.notes)
    r = extract_features([], [], backbone, cache, progress=False)
    assert r.notes == cache.notes  # the report carries the note to the user


def test_stale_cache_with_on_mismatch_error(reference, backbone, tmp_path: Path) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    before = chunk_files(leaf)
    manifest = (leaf / MANIFEST).read_bytes()
    for other in _other_keys(reference.cache.key):
        with pytest.raises(RetinaLensError, match="feature cache"):
            FeatureCache(leaf, other, on_mismatch="error")
    with pytest.raises(RetinaLensError):
        open_cache(leaf, backbone, "bf16", on_mismatch="error")
    assert chunk_files(leaf) == before and (leaf / MANIFEST).read_bytes() == manifest  # untouched
    assert len(FeatureCache(leaf, reference.cache.key, on_mismatch="error")) == N


def test_unreadable_manifest_is_stale(reference, tmp_path: Path) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    (leaf / MANIFEST).write_text("{ half a manifest")
    with pytest.raises(RetinaLensError):
        FeatureCache(leaf, reference.cache.key, on_mismatch="error")
    cache = FeatureCache(leaf, reference.cache.key)
    assert len(cache) == 0 and cache.notes


def test_other_key_under_a_root_gets_its_own_folder(reference, backbone) -> None:
    before = chunk_files(reference.cache.dir)
    other = open_cache(reference.root, backbone, "bf16")
    assert other.dir != reference.cache.dir and other.dir.parent == reference.root
    assert other.notes == [] and len(other) == 0
    assert chunk_files(reference.cache.dir) == before


# -- damage after a crash or a bad disk --------------------------------------------------------

def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", [
    "spatial-half", "pooled-half", "pooled-header", "record-garbage",
    "spatial-empty",
])
def test_corrupt_chunk_is_dropped_and_reextracted(reference, backbone, images, expected, tmp_path: Path,
                                                  damage: str) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    victim = sorted(leaf.glob("chunk-*.json"))[1]
    name = victim.name[: -len(".json")]
    lost = json.loads(victim.read_text())["keys"]
    target, keep = {"spatial-half": (".spatial.npy", 0.5), "pooled-half": (".pooled.npy", 0.5),
                    "pooled-header": (".pooled.npy", 0.0005), "record-garbage": (".json", None),
                    "spatial-empty": (".spatial.npy", 0.0)}[damage]
    if keep is None:
        (leaf / f"{name}{target}").write_text("{not json")
    else:
        _truncate(leaf / f"{name}{target}", keep)
    cache = FeatureCache(leaf, reference.cache.key)
    assert len(cache) == N - len(lost)
    assert any(name in note and "corrupt" in note for note in cache.notes), cache.notes
    assert not list(leaf.glob(f"{name}.*"))  # the damaged chunk's files are gone
    assert all(h not in cache for h in lost)
    r = extract(images, backbone, cache)
    assert r.n_extracted == len(lost) and r.n_cached == N - len(lost)
    assert set(chunk_files(leaf)) == set(chunk_files(reference.cache.dir))
    for h in lost:
        assert np.array_equal(cache.pooled([h])[0], expected[h][1])
        assert np.array_equal(cache.spatial([h])[0], expected[h][0])


def test_stray_temp_files_are_swept(reference, tmp_path: Path) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    chunk = sorted(leaf.glob("chunk-*.json"))[0].name[: -len(".json")]
    strays = [leaf / f".{chunk}.spatial.npy.k3j2h1.tmp", leaf / f".{MANIFEST}.x9y8.tmp", leaf / ".chunk-0.json.q.tmp"]
    for s in strays:
        s.write_bytes(b"half-written")
        os.utime(s, (time.time() - 7200, time.time() - 7200))  # left by a writer killed 2 h ago
    young = leaf / f".{chunk}.pooled.npy.live.tmp"  # a live writer's: must survive
    young.write_bytes(b"being written")
    keep = leaf / "notes.txt"  # not ours to delete
    keep.write_text("user file")
    cache = FeatureCache(leaf, reference.cache.key)
    assert not any(s.exists() for s in strays)
    assert keep.exists() and young.exists()
    assert len(cache) == N


def test_arrays_without_commit_record_are_not_adopted(reference, backbone, images, tmp_path: Path) -> None:
    leaf = copy_cache(reference.cache, tmp_path)
    record = sorted(leaf.glob("chunk-*.json"))[2]
    keys = json.loads(record.read_text())["keys"]
    record.unlink()  # killed after the arrays, before the commit
    cache = FeatureCache(leaf, reference.cache.key)
    assert len(cache) == N - len(keys) and all(k not in cache for k in keys)
    r = extract(images, backbone, cache)
    assert r.n_extracted == len(keys)
    ref = chunk_files(reference.cache.dir)
    assert {k: v[1] for k, v in chunk_files(leaf).items()} == {k: v[1] for k, v in ref.items()}


# -- undecodable images --------------------------------------------------------------------------

def test_bad_image_reported_not_cached_not_retried(backbone, images, tmp_path: Path) -> None:
    data = images[0].read_bytes()
    bad = tmp_path / "broken-scan.jpeg"
    bad.write_bytes(data[: len(data) // 2])
    good = images[1:6]
    paths = [*good[:2], bad, *good[2:]]
    cache = open_cache(tmp_path / "cache", backbone, "fp32")
    r = extract(paths, backbone, cache)
    assert r.n_images == 6 and r.n_extracted == 5
    assert len(r.failures) == 1
    path, reason = r.failures[0]
    assert path == str(bad) and "broken-scan.jpeg" in reason
    h_bad = sha256_file(bad)
    assert h_bad not in cache and len(cache) == 5
    assert cache.failure(h_bad) == reason
    assert cache.missing([h_bad]) == []
    assert all(h_bad not in rec["keys"] for rec in records(cache.dir))
    # rerun (a fresh process would open the cache again): nothing extracted, failure still reported
    before = chunk_files(cache.dir)
    again = open_cache(tmp_path / "cache", backbone, "fp32")
    r2 = extract(paths, backbone, again)
    assert r2.n_extracted == 0 and r2.n_cached == 5
    assert r2.failures == [(str(bad), reason)]
    assert chunk_files(cache.dir) == before
    with pytest.raises(KeyError):
        again.pooled([h_bad])


def test_chunk_of_only_failures_is_remembered(backbone, tmp_path: Path) -> None:
    bad = tmp_path / "not-an-image.jpeg"
    bad.write_text("plain text, not a JPEG\n" * 10)
    cache = open_cache(tmp_path / "cache", backbone, "fp32")
    r = extract([bad], backbone, cache)
    assert r.n_extracted == 0 and [p for p, _ in r.failures] == [str(bad)]
    again = open_cache(tmp_path / "cache", backbone, "fp32")
    assert again.notes == []
    r2 = extract([bad], backbone, again)
    assert r2.n_extracted == 0 and [p for p, _ in r2.failures] == [str(bad)]


# -- shards --------------------------------------------------------------------------------------

# -- resume after kill -9 ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["after-commit", "mid-chunk"])
def test_resume_after_kill9_is_bit_identical(reference, backbone, images, tmp_path: Path, mode: str) -> None:
    root = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(CHILD), str(root), mode, "2", *map(str, images)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == -9, f"child was not killed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    (leaf,) = [p for p in root.iterdir() if p.is_dir()]
    assert leaf.name == reference.cache.dir.name
    committed = 2 if mode == "after-commit" else 1
    assert len(list(leaf.glob("chunk-*.json"))) == committed

    cache = open_cache(root, backbone, "fp32")
    assert len(cache) == 4 * committed
    r = extract(images, backbone, cache)
    assert (r.n_extracted, r.n_cached, r.failures) == (N - 4 * committed, 4 * committed, [])

    final = open_cache(root, backbone, "fp32")
    ref = reference.cache
    keys = sorted(k for rec in records(leaf) for k in rec["keys"])
    assert keys == sorted(k for rec in records(ref.dir) for k in rec["keys"]) and len(keys) == N
    assert len(final) == N
    for h in keys:
        assert np.array_equal(final.pooled([h]), ref.pooled([h])), h[:12]
        assert np.array_equal(final.spatial([h]), ref.spatial([h])), h[:12]
    # same chunk files, byte for byte; no temp files left
    assert sorted(p.name for p in leaf.iterdir() if p.name != MANIFEST) == \
        sorted(p.name for p in ref.dir.iterdir() if p.name != MANIFEST)
    assert {k: v[1] for k, v in chunk_files(leaf).items()} == {k: v[1] for k, v in chunk_files(ref.dir).items()}


def test_a_foreign_folder_with_a_manifest_is_never_emptied(backbone, tmp_path: Path) -> None:
    """--cache pointed at a user's folder that happens to hold a manifest.json: used as a root."""
    (tmp_path / MANIFEST).write_text('{"name": "my project"}')
    (tmp_path / "notes.txt").write_text("mine")
    cache = open_cache(tmp_path, backbone, "fp32")
    assert cache.dir.parent == tmp_path and not cache.notes
    assert (tmp_path / MANIFEST).read_text() == '{"name": "my project"}' and (tmp_path / "notes.txt").exists()
