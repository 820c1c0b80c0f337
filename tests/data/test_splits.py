"""make_splits invariants: patient- and content-disjoint, given test kept, val carved by patient,
stratified, seeded; duplicates and shared patients removed and reported; assert_disjoint catches leaks."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from retinalens.data.discover import Dataset, Sample, discover
from retinalens.data.hashing import sha256_file
from retinalens.data.splits import SPLITS, SplitConfig, Splits, assert_disjoint, make_splits

# Imbalanced: patients per class in train (test gets a quarter as many, at least 2).
PATIENTS = {"CNV": 28, "DME": 14, "DRUSEN": 9, "NORMAL": 40}


def _build(root: Path, make_png, *, with_test: bool = True) -> None:
    """OCT2017-like layout with several images per patient (1-4), distinct pixels in every file."""
    rng = np.random.default_rng(1234)
    seed = 0
    patient = 1000
    for cls, n_train in PATIENTS.items():
        plan = [("train", n_train)] + ([("test", max(2, n_train // 4))] if with_test else [])
        for split, n in plan:
            for _ in range(n):
                patient += 1
                for k in range(int(rng.integers(1, 5))):
                    seed += 1
                    folder = root / split / cls if with_test else root / cls
                    make_png(folder / f"{cls}-{patient}-{k}.png", seed, size=(8, 6))


@pytest.fixture
def synth(tmp_path: Path, make_png) -> Path:
    root = tmp_path / "synth"
    _build(root, make_png)
    return root


def check_invariants(ds: Dataset, splits: Splits) -> dict[str, set[int]]:
    """The guarantees behind every metric, checked independently of assert_disjoint."""
    parts = {name: set(splits.indices(name)) for name in SPLITS}
    for name in SPLITS:
        assert len(parts[name]) == len(splits.indices(name)), f"duplicate index in {name}"
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not parts[a] & parts[b]
        pa = {ds.samples[i].patient for i in parts[a]}
        pb = {ds.samples[i].patient for i in parts[b]}
        assert not pa & pb, f"patients in {a} and {b}: {sorted(pa & pb)[:5]}"
        ha = {splits.hashes[i] for i in parts[a]}
        hb = {splits.hashes[i] for i in parts[b]}
        assert not ha & hb, f"identical files in {a} and {b}"
    # every image is either in exactly one split or reported as removed
    removed_paths = [r["path"] for r in splits.removed]
    assert len(removed_paths) == len(set(removed_paths))
    kept_paths = {str(ds.samples[i].path) for p in parts.values() for i in p}
    assert kept_paths.isdisjoint(removed_paths)
    assert len(kept_paths) + len(removed_paths) == len(ds.samples)
    return parts


def test_hashes_are_the_files_sha256(synth: Path) -> None:
    ds = discover(synth)
    splits = make_splits(ds)
    assert len(splits.hashes) == len(ds.samples)
    for i in range(0, len(ds.samples), 17):
        assert splits.hashes[i] == sha256_file(ds.samples[i].path)
    assert len(set(splits.hashes)) == len(ds.samples)  # the synthetic files are all distinct


def test_invariants_on_synthetic_split_dataset(synth: Path) -> None:
    ds = discover(synth)
    splits = make_splits(ds, SplitConfig(val_fraction=0.15, seed=0))
    parts = check_invariants(ds, splits)
    assert splits.removed == []  # nothing to remove in a clean data set
    # the given test split is untouched
    assert parts["test"] == {i for i, s in enumerate(ds.samples) if s.split == "test"}
    assert parts["train"] | parts["val"] == {i for i, s in enumerate(ds.samples) if s.split == "train"}
    # val is carved by patient at roughly the fraction
    train_patients = {ds.samples[i].patient for i in parts["train"]}
    val_patients = {ds.samples[i].patient for i in parts["val"]}
    frac_patients = len(val_patients) / (len(val_patients) + len(train_patients))
    frac_images = len(parts["val"]) / (len(parts["val"]) + len(parts["train"]))
    assert 0.09 <= frac_patients <= 0.22, frac_patients
    assert 0.07 <= frac_images <= 0.25, frac_images
    # stratified: every class (each has >= 9 train patients) is in val and in train
    assert {ds.samples[i].label for i in parts["val"]} == set(PATIENTS)
    assert {ds.samples[i].label for i in parts["train"]} == set(PATIENTS)
    # ... and the val class mix follows train's (the majority class stays the majority)
    val_counts = Counter(ds.samples[i].label for i in parts["val"])
    assert val_counts.most_common(1)[0][0] == "NORMAL"
    summary = splits.summary(ds)
    assert summary["val"]["n_images"] == len(parts["val"])
    assert summary["val"]["n_patients"] == len(val_patients)
    assert summary["removed"]["n"] == 0


def test_deterministic_for_a_seed_and_different_for_another(synth: Path) -> None:
    ds = discover(synth)
    hashes = make_splits(ds).hashes
    a = make_splits(ds, SplitConfig(seed=3), hashes=hashes)
    b = make_splits(ds, SplitConfig(seed=3), hashes=hashes)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    vals = {tuple(make_splits(ds, SplitConfig(seed=s), hashes=hashes).val) for s in (4, 5, 6)}
    vals.add(tuple(a.val))
    assert len(vals) >= 3, "different seeds should carve different validation patients"
    for s in (4, 5):
        check_invariants(ds, make_splits(ds, SplitConfig(seed=s), hashes=hashes))


def test_given_hashes_are_used(synth: Path) -> None:
    ds = discover(synth)
    fake = [f"{i:064x}" for i in range(len(ds.samples))]
    fake[5] = fake[0]  # claim two files are identical
    splits = make_splits(ds, hashes=fake)
    assert splits.hashes is fake or splits.hashes == fake
    assert [r["reason"] for r in splits.removed] == ["duplicate file"]


def test_test_split_carved_when_absent(tmp_path: Path, make_png) -> None:
    _build(tmp_path / "flat", make_png, with_test=False)
    ds = discover(tmp_path / "flat")
    assert ds.layout == "class-folders"
    splits = make_splits(ds, SplitConfig(val_fraction=0.15, test_fraction=0.2, seed=1))
    parts = check_invariants(ds, splits)
    assert all(parts[name] for name in SPLITS)
    frac = len(parts["test"]) / len(ds.samples)
    assert 0.1 <= frac <= 0.3, frac
    assert {ds.samples[i].label for i in parts["test"]} == set(PATIENTS)


def test_duplicate_across_train_and_test_keeps_the_test_copy(synth: Path) -> None:
    test_file = sorted((synth / "test" / "DME").glob("*.png"))[0]
    copy = synth / "train" / "DME" / "DME-999999-0.png"  # another patient id, same bytes
    shutil.copy(test_file, copy)
    ds = discover(synth)
    splits = make_splits(ds)
    parts = check_invariants(ds, splits)
    idx = {str(s.path): i for i, s in enumerate(ds.samples)}
    assert idx[str(test_file)] in parts["test"]
    assert all(idx[str(copy)] not in p for p in parts.values())
    assert parts["test"] == {i for i, s in enumerate(ds.samples) if s.split == "test"}
    assert len(splits.removed) == 1
    r = splits.removed[0]
    assert r["reason"] == "duplicate file" and r["path"] == str(copy) and r["same_as"] == str(test_file)
    assert r["label_conflict"] is False
    assert splits.summary(ds)["removed"] == {"n": 1, "reasons": {"duplicate file": 1}}


def test_duplicate_with_conflicting_label_is_flagged(synth: Path) -> None:
    test_file = sorted((synth / "test" / "CNV").glob("*.png"))[0]
    copy = synth / "train" / "NORMAL" / "NORMAL-888888-0.png"
    shutil.copy(test_file, copy)
    ds = discover(synth)
    splits = make_splits(ds)
    check_invariants(ds, splits)
    (r,) = splits.removed
    assert r["path"] == str(copy) and r["label_conflict"] is True


def test_duplicates_within_train_keep_one(synth: Path) -> None:
    src = sorted((synth / "train" / "CNV").glob("*.png"))[0]
    copies = [synth / "train" / "CNV" / f"CNV-77777{k}-0.png" for k in range(2)]
    for c in copies:
        shutil.copy(src, c)
    ds = discover(synth)
    splits = make_splits(ds)
    parts = check_invariants(ds, splits)
    same = [i for i, s in enumerate(ds.samples) if s.path in [src, *copies]]
    kept = [i for i in same if any(i in p for p in parts.values())]
    assert len(kept) == 1
    assert sorted(r["path"] for r in splits.removed) == sorted(str(ds.samples[i].path) for i in same if i not in kept)


def test_patient_in_train_and_test_is_dropped_from_train(synth: Path, make_png) -> None:
    test_patient = sorted((synth / "test" / "NORMAL").glob("*.png"))[0].stem.split("-")[1]
    leaked = [make_png(synth / "train" / cls / f"{cls}-{test_patient}-{50 + k}.png", 900_000 + k)
              for k, cls in enumerate(["NORMAL", "DRUSEN"])]
    ds = discover(synth)
    splits = make_splits(ds)
    parts = check_invariants(ds, splits)
    assert parts["test"] == {i for i, s in enumerate(ds.samples) if s.split == "test"}
    assert sorted(r["path"] for r in splits.removed) == sorted(str(p) for p in leaked)
    assert all(r["reason"] == "patient also in test" and r["patient"] == test_patient for r in splits.removed)
    assert test_patient not in {ds.samples[i].patient for i in parts["train"] | parts["val"]}


def test_given_val_split_is_kept(tmp_path: Path, make_png) -> None:
    root = tmp_path / "tvt"
    seed = 0
    for split, first in (("train", 0), ("val", 100), ("test", 200)):
        for cls in ("A", "B"):
            for p in range(first, first + 6):
                seed += 1
                make_png(root / split / cls / f"{cls}-{p}-0.png", seed)
    make_png(root / "train" / "A" / "A-100-9.png", 10_000)  # a val patient also in train
    ds = discover(root)
    splits = make_splits(ds)
    parts = check_invariants(ds, splits)
    assert parts["val"] == {i for i, s in enumerate(ds.samples) if s.split == "val"}
    assert [r["reason"] for r in splits.removed] == ["patient also in val"]
    assert splits.removed[0]["path"].endswith("A-100-9.png")


def _leaky(tmp_path: Path) -> tuple[Dataset, list[str]]:
    samples = [Sample(tmp_path / f"{i}.png", "A" if i % 2 else "B", f"p{i}") for i in range(6)]
    return Dataset(tmp_path, "class-folders", samples, ["A", "B"]), [f"{i:064x}" for i in range(6)]


def test_assert_disjoint_accepts_clean_splits(tmp_path: Path) -> None:
    ds, hashes = _leaky(tmp_path)
    assert_disjoint(ds, Splits([0, 1, 2], [3], [4, 5], hashes))


def test_assert_disjoint_catches_shared_patient(tmp_path: Path) -> None:
    ds, hashes = _leaky(tmp_path)
    ds.samples[4] = Sample(ds.samples[4].path, "A", "p0")  # p0 in train and test
    with pytest.raises(AssertionError, match="p0"):
        assert_disjoint(ds, Splits([0, 1, 2], [3], [4, 5], hashes))


def test_assert_disjoint_catches_identical_file(tmp_path: Path) -> None:
    ds, hashes = _leaky(tmp_path)
    hashes[5] = hashes[3]  # the same bytes in val and test under two patients
    with pytest.raises(AssertionError, match="5.png"):
        assert_disjoint(ds, Splits([0, 1, 2], [3], [4, 5], hashes))


def test_assert_disjoint_catches_index_in_two_splits(tmp_path: Path) -> None:
    ds, hashes = _leaky(tmp_path)
    with pytest.raises(AssertionError):
        assert_disjoint(ds, Splits([0, 1, 2], [2, 3], [4, 5], hashes))


def test_real_oct_splits(oct_root: Path) -> None:
    ds = discover(oct_root)
    splits = make_splits(ds, SplitConfig(seed=0))
    parts = check_invariants(ds, splits)
    assert_disjoint(ds, splits)
    given_test = {i for i, s in enumerate(ds.samples) if s.split == "test"}
    removed = {r["path"] for r in splits.removed}
    # the given test split is kept whole, except exact duplicates within it
    assert parts["test"] == {i for i in given_test if str(ds.samples[i].path) not in removed}
    assert all(r["reason"] == "duplicate file" for r in splits.removed if r["path"] in
               {str(ds.samples[i].path) for i in given_test})
    assert len(parts["test"]) >= 0.95 * len(given_test)
    frac = len(parts["val"]) / (len(parts["val"]) + len(parts["train"]))
    assert 0.07 <= frac <= 0.25, frac
    assert {ds.samples[i].label for i in parts["val"]} == set(ds.classes)
    again = make_splits(ds, SplitConfig(seed=0), hashes=splits.hashes)
    assert (again.train, again.val, again.test) == (splits.train, splits.val, splits.test)


@pytest.mark.parametrize("fraction", [0.0, 0.6, 1.5, -0.1])
def test_fractions_outside_zero_one_are_clear_errors(fraction, tmp_path) -> None:
    from retinalens.data.discover import Dataset, Sample
    from retinalens.data.splits import SplitConfig, make_splits
    from retinalens.errors import RetinaLensError

    ds = Dataset(tmp_path, "class-folders", [Sample(tmp_path / f"{i}.png", "AB"[i % 2], str(i)) for i in range(8)], ["A", "B"])
    with pytest.raises(RetinaLensError, match="between 0 and 0.5"):
        make_splits(ds, SplitConfig(val_fraction=fraction), hashes=[str(i) for i in range(8)])
