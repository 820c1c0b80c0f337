"""Near-duplicate detection (data/near_duplicates.py) on real OCT scans: resized, re-encoded and
slightly cropped copies are found, distinct scans of different patients are not, and `train` keeps
a training copy of a test scan out."""

import io
import json
import shutil

import numpy as np
import pytest

from retinalens.data.decode import decode_image
from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.data.near_duplicates import MIN_COSINE, PHASH_BITS, near_duplicate_pairs
from retinalens.features.extract import extract_features, open_cache
from retinalens.models.registry import resolve_precision
from retinalens.train.pipeline import build_run_config, train_bundle

COPIES = {  # name -> (transform of a greyscale scan, JPEG quality)
    "half": (lambda im: im.resize((im.width // 2, im.height // 2)), 95),
    "q50": (lambda im: im, 50),
    "half_q30": (lambda im: im.resize((im.width // 2, im.height // 2)), 30),
    "crop2": (lambda im: im.crop((int(.02 * im.width), int(.02 * im.height), int(.98 * im.width), int(.98 * im.height))), 90),
    "crop5": (lambda im: im.crop((int(.05 * im.width), int(.05 * im.height), int(.95 * im.width), int(.95 * im.height))), 90),
}


def _copy(src, dst, name):
    transform, quality = COPIES[name]
    buf = io.BytesIO()
    transform(decode_image(src, keep_grey=True)).save(buf, "JPEG", quality=quality)
    dst.write_bytes(buf.getvalue())
    return dst


@pytest.fixture(scope="module")
def pooled(backbone, tmp_path_factory):
    cache = open_cache(tmp_path_factory.mktemp("nd-cache"), backbone, resolve_precision("auto"), spatial=False)

    def features(paths):
        hashes = sha256_files(paths)
        extract_features(list(paths), hashes, backbone, cache, precision=resolve_precision("auto"), progress=False)
        return cache.pooled(hashes)

    return features


def test_resized_reencoded_and_cropped_copies_are_found(oct_images, pooled, tmp_path):
    copies, origin = [], []
    for i, src in enumerate(oct_images):  # two real scans per class
        for name in COPIES:
            copies.append(_copy(src, tmp_path / f"{src.stem}.{name}.jpeg", name))
            origin.append(i)
    pairs = near_duplicate_pairs(oct_images, pooled(oct_images), copies, pooled(copies))
    found = {(i, j) for i, j, _, _ in pairs}
    assert {(origin[j], j) for j in range(len(copies))} <= found  # every copy meets its original ...
    assert all(origin[j] == i for i, j in found)  # ... and no other scan
    assert all(bits <= PHASH_BITS and cos >= MIN_COSINE for _, _, bits, cos in pairs)


def test_distinct_scans_of_different_patients_are_not_near_duplicates(oct_sample_root, pooled):
    train = sorted(discover(oct_sample_root / "train").samples, key=lambda s: s.path)[::4]
    test = discover(oct_sample_root / "test").samples
    assert not {s.patient for s in train} & {s.patient for s in test}
    a, b = [s.path for s in train], [s.path for s in test]
    assert near_duplicate_pairs(a, pooled(a), b, pooled(b)) == []  # len(a) x len(b) pairs, none flagged
    same = near_duplicate_pairs(a, pooled(a), a, pooled(a), same_set=True,
                                groups=([s.patient for s in train], [s.patient for s in train]))
    assert same == []  # nor any two training scans of different patients


def test_train_removes_a_training_copy_of_a_test_scan(small_dataset, feature_cache, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    test_scan = sorted((data / "test" / "DME").glob("*.jpeg"))[0]
    # A half-size re-save of a test scan, filed in train under another patient's name: sha256 differs.
    leak = _copy(test_scan, data / "train" / "DME" / "DME-9999999-1.jpeg", "half")
    bundle = train_bundle(build_run_config(data, cache=feature_cache, head="logreg", cv=0), tmp_path / "m",
                          progress=False)
    splits = json.loads((bundle.path / "splits.json").read_text())
    removed = [r for r in splits["removed"] if r["reason"] == "near-duplicate of a test image"]
    assert [(r["path"], r["same_as"]) for r in removed] == [(str(leak), str(test_scan))]
    leak_hash = sha256_files([leak])[0]
    assert leak_hash not in splits["sha256"]["train"] and leak_hash not in splits["sha256"]["val"]
    assert np.isclose(bundle.manifest.training.splits["removed"]["n"], len(splits["removed"]))
