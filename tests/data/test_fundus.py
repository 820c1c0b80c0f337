"""Fundus preparation: the field of view on every real photograph and on synthetic discs, unusable
images, `prepare_fundus` on a folder and a CSV (resumable, source untouched), contrast, the CLI.

Real photographs come from the shared data folder (Kaggle DR sample, IDRiD) and are never copied into
the repository; a few are copied into tmp_path for the pipeline tests.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from helpers import run_cli
from retinalens.data.decode import decode_image
from retinalens.data.discover import discover
from retinalens.data.fundus import FOV, UnusableFundusError, find_fov, prepare_fundus, prepare_image
from retinalens.errors import RetinaLensError


# -- synthetic fundus photographs -------------------------------------------------------------------

def fundus_like(w: int, h: int, cx: float, cy: float, r: float, seed: int = 0, rim: float = 0.3,
                glow: float = 0.0) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A textured reddish disc on a noisy black background, darker towards its rim (vignetting), with an
    optional glow outside it (as IDRiD's camera has). Returns the image and the disc's bounding box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    d = np.hypot(xx - cx, yy - cy)
    inside = d <= r
    texture = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8))
                         .resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    bright = (120 + 80 * texture) * (1 - (1 - rim) * np.clip(d / r, 0, 1) ** 4)
    img = np.stack([bright, 0.5 * bright, 0.25 * bright], axis=-1) * inside[..., None]
    if glow:
        img[..., 0] += ~inside * glow * np.exp(-(d - r) / (0.08 * r))
    img += rng.uniform(0, 3, (h, w, 3))
    ys, xs = np.nonzero(inside)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


# w, h, centre x, centre y, radius: centred, off-centre, Kaggle-like (cut at top and bottom), cut at
# one side only, cut at the left and top, small, large (found on a reduced copy).
DISCS = [(600, 400, 300, 200, 180), (600, 400, 250, 230, 150), (768, 512, 384, 256, 300),
         (768, 512, 420, 240, 330), (768, 512, 380, 300, 280), (500, 500, 150, 260, 260),
         (300, 200, 150, 100, 90), (2000, 1400, 980, 700, 820)]


@pytest.mark.parametrize("w,h,cx,cy,r", DISCS)
@pytest.mark.parametrize("kind", ["plain", "dim rim", "glow"])
def test_find_fov_matches_the_disc(w: int, h: int, cx: float, cy: float, r: float, kind: str) -> None:
    # Dim rim: 15-25 of 255 at the edge (some Kaggle photos); glow: up to 30 outside a bright rim
    # (IDRiD). No fixed threshold separates both from the background.
    img, disc = fundus_like(w, h, cx, cy, r, rim=0.08 if kind == "dim rim" else 0.3, glow=30 if kind == "glow" else 0)
    fov = find_fov(img)
    assert isinstance(fov, FOV)
    tol = 1 if max(w, h) <= 1024 else 3  # large images are searched at half size: one block of margin
    assert np.abs(np.subtract(fov.box, disc)).max() <= tol, (fov.box, disc)
    assert fov.box[0] <= disc[0] and fov.box[1] <= disc[1] and fov.box[2] >= disc[2] and fov.box[3] >= disc[3]
    assert abs(fov.centre[0] - cx) <= 0.02 * r and abs(fov.centre[1] - cy) <= 0.02 * r
    assert abs(fov.radius - r) <= 0.02 * r
    visible = np.mean(np.hypot(*(np.mgrid[0:h, 0:w] + 0.5 - np.array([cy, cx])[:, None, None])) <= r)
    assert abs(fov.fraction - visible) <= 0.02


def test_prepare_image_squares_and_centres_a_cut_disc() -> None:
    img, _ = fundus_like(768, 512, 380, 300, 280)  # cut at the bottom only: its centre is below the middle
    out = np.asarray(prepare_image(img, size=128))
    assert out.shape == (128, 128, 3)
    lit = out.max(axis=2) > 20
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    assert cols[0] <= 1 and cols[-1] >= 126  # the disc's full width fills the square
    assert rows[0] <= 1 and rows[-1] <= 118  # its cut-off bottom is padded with black, not its top
    assert out[120:].max() <= 5
    assert abs((cols[0] + cols[-1]) / 2 - 63.5) <= 1


# -- real photographs -------------------------------------------------------------------------------

def _fundus_sets(shared_data: Path) -> list[Path]:
    files = []
    for name in ("fundus-kaggle-dr", "fundus-idrid"):
        folder = shared_data / name / "images"
        if not folder.is_dir():
            pytest.skip(f"{folder} is absent")
        files += sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    return files


def crop_quality(img: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, float, float]:
    """How well `box` crops `img`, judged independently of find_fov's threshold:
    (share of the field of view outside the box, share of the black margin removed, margin left in the
    crop as a share of the image). Field of view: brighter than a quarter of the photo's typical
    brightness; black: <= 10; margin: the black outside the field of view's bounding box (the black
    corners round a disc inside its own box are no margin: no rectangular crop removes them)."""
    a = np.asarray(img)
    v = np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2]).astype(np.int32)
    fov = v > max(20.0, 0.25 * float(np.median(v[v > 20])))
    black = v <= 10
    crop = np.zeros_like(fov)
    crop[box[1]:box[3], box[0]:box[2]] = True
    col, row = fov.sum(axis=0), fov.sum(axis=1)  # the field of view's bounding box, ignoring stray specks
    cols, rows = np.flatnonzero(col >= max(2, 0.01 * col.max())), np.flatnonzero(row >= max(2, 0.01 * row.max()))
    fov_box = np.zeros_like(fov)
    fov_box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    margin = black & ~fov_box
    left = int((margin & crop).sum())
    return (float((fov & ~crop).sum() / fov.sum()), 1 - left / margin.sum() if margin.any() else 1.0, left / v.size)


def test_fov_on_every_real_photograph(shared_data: Path) -> None:
    """Kaggle DR and IDRiD: the crop keeps the whole field of view and removes >= 90% of the margin."""
    bad, removed = [], []
    for path in _fundus_sets(shared_data):
        img = decode_image(path, draft_size=250)  # 1536 px -> 384 px in the JPEG decoder
        fov = find_fov(img)
        if fov is None:
            bad.append(f"{path.name}: no field of view found")
            continue
        outside, margin_removed, margin_left = crop_quality(img, fov.box)
        removed.append(margin_removed)
        if outside > 0.005:
            bad.append(f"{path.name}: {outside:.2%} of the field of view outside the crop {fov.box}")
        if margin_removed < 0.9 and margin_left > 0.005:  # tiny margins: a pixel column is 10% of them
            bad.append(f"{path.name}: only {margin_removed:.1%} of the black margin removed ({fov.box})")
        bw, bh = fov.box[2] - fov.box[0], fov.box[3] - fov.box[1]
        if not 0.2 <= fov.fraction <= 1.0 or not 0.48 * max(bw, bh) <= fov.radius <= 0.6 * np.hypot(bw, bh):
            bad.append(f"{path.name}: implausible field of view {fov}")
    assert not bad, "\n".join(bad)
    assert len(removed) >= 100 and np.median(removed) >= 0.95


def test_crop_quality_catches_bad_crops(shared_data: Path) -> None:
    """The judge above fails the crops it should: the whole image, and a box that cuts the disc."""
    img = decode_image(shared_data / "fundus-kaggle-dr" / "images" / "10_left.jpeg", draft_size=250)
    fov = find_fov(img)
    assert crop_quality(img, (0, 0, *img.size))[1] < 0.1
    l, t, r, b = fov.box
    assert crop_quality(img, (l + (r - l) // 10, t, r, b))[0] > 0.02


# -- unusable images ------------------------------------------------------------------------------

def _unusable() -> dict[str, tuple[Image.Image, str]]:
    rng = np.random.default_rng(3)
    noisy = Image.fromarray(rng.integers(0, 25, (400, 600, 3), dtype=np.uint8))
    speck, _ = fundus_like(800, 600, 400, 300, 60)  # a disc of 5% of the frame
    return {
        "black": (Image.new("RGB", (600, 400)), "near-black"),
        "noise": (noisy, "near-black"),
        "tiny": (fundus_like(100, 80, 50, 40, 35)[0], "too small"),
        "speck": (speck, "field of view too small"),
    }


@pytest.mark.parametrize("name", ["black", "noise", "tiny", "speck"])
def test_unusable_images_raise_with_the_reason(name: str) -> None:
    img, reason = _unusable()[name]
    with pytest.raises(UnusableFundusError, match=reason) as exc:
        prepare_image(img)
    assert isinstance(exc.value, RetinaLensError) and "\n" not in str(exc.value)
    if name in ("black", "noise"):
        assert find_fov(img) is None


# -- prepare_fundus: folder and CSV ---------------------------------------------------------------------

def _kaggle(shared_data: Path) -> tuple[Path, dict[str, str]]:
    folder = shared_data / "fundus-kaggle-dr"
    if not (folder / "trainLabels.csv").is_file():
        pytest.skip(f"{folder} is absent")
    with open(folder / "trainLabels.csv", newline="") as f:
        return folder / "images", {r["image"]: r["level"] for r in csv.DictReader(f)}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones too) with its sha256: the source must never change."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def test_prepare_folder_drops_bad_images_skips_done_ones_and_never_touches_the_source(tmp_path: Path, shared_data: Path) -> None:
    images, _ = _kaggle(shared_data)
    src, dst = tmp_path / "src", tmp_path / "out"
    real = ["10_left.jpeg", "13_right.jpeg", "15_left.jpeg", "25_left.jpeg"]
    for name, where in zip(real, ["", "a", "a/b", "a/b"]):
        (src / where).mkdir(parents=True, exist_ok=True)
        shutil.copy(images / name, src / where / name)
    unusable = _unusable()
    for name in ("black", "noise", "tiny"):
        unusable[name][0].save(src / "a" / f"{name}.png")
    (src / "a" / "corrupt.jpeg").write_bytes((images / real[0]).read_bytes()[:400])
    (src / "notes.txt").write_text("not an image")
    before = _snapshot(src)

    report = prepare_fundus(src, dst, size=96, workers=2, progress=False)
    assert (report.kept, report.prepared, report.skipped_existing) == (4, 4, 0)
    reasons = {p.name: r for p, r in report.dropped}
    assert set(reasons) == {"black.png", "noise.png", "tiny.png", "corrupt.jpeg"}
    assert "near-black" in reasons["black.png"] and "near-black" in reasons["noise.png"]
    assert "too small" in reasons["tiny.png"] and "unreadable" in reasons["corrupt.jpeg"]
    outputs = sorted(p for p in dst.rglob("*.jpeg"))
    assert [p.relative_to(dst).as_posix() for p in outputs] == ["10_left.jpeg", "a/13_right.jpeg",
                                                                "a/b/15_left.jpeg", "a/b/25_left.jpeg"]
    for p in outputs:
        with Image.open(p) as im:
            assert im.size == (96, 96) and im.format == "JPEG"
    assert _snapshot(src) == before

    saved = json.loads((dst / "prepare_report.json").read_text())
    assert saved["complete"] and saved["settings"] == {"size": 96, "contrast": False, "format": "jpeg"}
    assert saved["counts"] == {"images": 8, "kept": 4, "prepared": 4, "skipped_existing": 0, "dropped": 4}
    assert {Path(d["image"]).name for d in saved["dropped"]} == set(reasons)
    for rel, box in saved["crop_boxes"].items():  # in the source's own pixels (it was decoded at 1/4)
        full = decode_image(src / rel)
        expected = find_fov(full).box
        assert np.abs(np.subtract(box, expected)).max() <= 0.01 * max(full.size) + 2, (rel, box, expected)

    # A second run does nothing; a run "killed" after some images redoes exactly the missing ones.
    stamps = _mtimes(outputs)
    again = prepare_fundus(src, dst, size=96, workers=2, progress=False)
    assert (again.kept, again.skipped_existing, again.prepared) == (4, 4, 0)
    assert _mtimes(outputs) == stamps and len(again.dropped) == 4
    lost = outputs[1:3]
    contents = {p: p.read_bytes() for p in lost}
    for p in lost:
        p.unlink()
    stale = outputs[1].parent / f".{outputs[1].name}.x1y2.tmp"  # what a killed writer leaves
    stale.write_bytes(b"half a file")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    resumed = prepare_fundus(src, dst, size=96, workers=2, progress=False)
    assert (resumed.kept, resumed.skipped_existing, resumed.prepared) == (4, 2, 2)
    assert {p: p.read_bytes() for p in lost} == contents  # the same bytes as the first time
    assert all(outputs[i].stat().st_mtime_ns == stamps[outputs[i]] for i in (0, 3))
    assert not stale.exists()
    assert len(json.loads((dst / "prepare_report.json").read_text())["crop_boxes"]) == 4
    assert _snapshot(src) == before


def test_prepare_csv_writes_a_dataset_discover_reads(tmp_path: Path, shared_data: Path) -> None:
    images, levels = _kaggle(shared_data)
    picked = [n for n in sorted(levels) if levels[n] == "0"][:2] + [n for n in sorted(levels) if levels[n] != "0"][:2]
    data = tmp_path / "kaggle"
    (data / "images").mkdir(parents=True)
    rows = []
    for i, name in enumerate(picked):
        if i % 2:  # named with an extension, and not .jpeg: labels.csv must name the new file
            shutil.copy(images / f"{name}.jpeg", data / "images" / f"{name}.jpg")
            rows.append((f"{name}.jpg", levels[name], f"p{i}"))
        else:  # Kaggle style: no extension
            shutil.copy(images / f"{name}.jpeg", data / "images" / f"{name}.jpeg")
            rows.append((name, levels[name], f"p{i}"))
    Image.new("RGB", (640, 480)).save(data / "images" / "dark_left.jpeg")
    rows += [("dark_left", "2", "p8"), ("missing_right", "1", "p9")]
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "level", "patient"), *rows])
    before = _snapshot(data)

    dst = tmp_path / "prepared"
    report = prepare_fundus(data / "labels.csv", dst, size=64, workers=2, progress=False)
    assert report.kept == 4 and {p.name for p, _ in report.dropped} == {"dark_left.jpeg", "missing_right"}
    with open(dst / "labels.csv", newline="") as f:
        out_rows = list(csv.reader(f))
    expected = [r if not r[0].endswith(".jpg") else (r[0][:-4] + ".jpeg", *r[1:]) for r in rows[:4]]
    assert out_rows == [["image", "level", "patient"], *map(list, expected)]
    ds = discover(dst / "labels.csv")
    assert len(ds) == 4 and ds.classes[0] == "0"
    for sample, (name, level, _) in zip(ds.samples, rows):
        assert sample.path.parent == dst / "images" and sample.path.stem == Path(name).stem
        assert sample.label == level
        with Image.open(sample.path) as im:
            assert im.size == (64, 64)
    assert _snapshot(data) == before
    assert prepare_fundus(data / "labels.csv", dst, size=64, workers=1, progress=False).skipped_existing == 4


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, make_png) -> None:
    src = tmp_path / "src"
    make_png(src / "x.png", 1, size=(300, 200))
    for dst in (src, src / "prepared", tmp_path):  # the source itself, inside it, around it
        with pytest.raises(RetinaLensError, match="destination must not"):
            prepare_fundus(src, dst, progress=False)
    assert sorted(p.name for p in src.rglob("*")) == ["x.png"]
    (tmp_path / "labels.csv").write_text("image,level\nx.png,0\n")
    with pytest.raises(RetinaLensError, match="destination must not"):
        prepare_fundus(tmp_path / "labels.csv", tmp_path, progress=False)
    with pytest.raises(RetinaLensError, match="no such file"):
        prepare_fundus(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetinaLensError, match="no images"):
        prepare_fundus(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "bad.csv").write_text("file,level\nx.png,0\n")
    with pytest.raises(RetinaLensError, match="'image' column"):
        prepare_fundus(tmp_path / "bad.csv", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_two_sources_with_one_output_name_keep_the_first(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    eye = fundus_like(400, 300, 200, 150, 140)[0]
    eye.save(src / "eye.jpg")
    eye.save(src / "eye.png")
    report = prepare_fundus(src, tmp_path / "out", size=64, workers=1, progress=False)
    assert report.kept == 1 and report.dropped == [(src / "eye.png", "same output name as eye.jpg (eye.jpeg)")]


def test_a_destination_prepared_with_other_settings_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    fundus_like(400, 300, 200, 150, 140)[0].save(src / "eye.png")
    assert prepare_fundus(src, tmp_path / "out", size=64, workers=1, progress=False).kept == 1
    with pytest.raises(RetinaLensError, match="size=64"):
        prepare_fundus(src, tmp_path / "out", size=128, workers=1, progress=False)
    assert prepare_fundus(src, tmp_path / "png", size=64, workers=1, progress=False, fmt="png").kept == 1
    assert (tmp_path / "png" / "eye.png").is_file()


# -- contrast ---------------------------------------------------------------------------------

def test_contrast_normalises_inside_the_disc_and_keeps_the_outside_black(shared_data: Path) -> None:
    images, _ = _kaggle(shared_data)
    # A real photo cut at the top and bottom (its detail: vessels; amplified ~3.5x, measured), and a
    # synthetic disc cut at the bottom (smooth texture: the blur takes most of it).
    for img, gain in ((decode_image(images / "25_left.jpeg", draft_size=512), 3.0),
                      (fundus_like(768, 512, 380, 300, 280)[0], 1.5)):
        plain = np.asarray(prepare_image(img, size=128)).astype(np.int32)
        graham = np.asarray(prepare_image(img, size=128, contrast=True)).astype(np.int32)
        v = plain.max(axis=2)
        inside, outside = ndi.binary_erosion(v > 30, iterations=3), v <= 8  # the disc less its rim; black
        assert outside.sum() > 1000 and inside.sum() > 5000
        assert np.abs(graham - plain)[inside].mean() > 20
        assert abs(np.median(graham[inside]) - 128) < 25  # the local average removed: neutral grey
        assert graham[outside].max() == 0
        # Not a flat grey either: local detail is amplified (4x, less what the blur also holds).
        detail = [np.abs(np.diff(x, axis=1))[inside[:, 1:] & inside[:, :-1]].mean() for x in (plain, graham)]
        assert detail[1] > gain * detail[0]


# -- command line -----------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=300)


def test_cli_prepares_and_reports(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    fundus_like(400, 300, 200, 150, 140)[0].save(src / "eye.png")
    Image.new("RGB", (400, 300)).save(src / "black.png")
    r = _cli("prepare", "fundus", str(src), str(tmp_path / "out"), "--size", "64", "--workers", "1", "-q")
    assert r.returncode == 0, r.stderr
    assert "prepared 1 images" in r.stderr and "1 new" in r.stderr and "dropped 1" in r.stderr
    assert "black.png: near-black" in r.stderr
    assert (tmp_path / "out" / "eye.jpeg").is_file()

    r = _cli("prepare", "fundus", str(tmp_path / "nope"), str(tmp_path / "out2"), "-q")
    assert r.returncode == 2
    assert "error:" in r.stderr and "no such file" in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out2").exists()

    r = _cli("prepare", "fundus", str(src), str(tmp_path / "out"), "--size", "64", "-q")  # a rerun skips the image
    assert r.returncode == 0, r.stderr
    assert "(0 new, 1 already there)" in r.stderr


def test_a_dicom_photograph_is_prepared_as_its_pixels_are(tmp_path: Path, shared_data: Path) -> None:
    """An Ophthalmic Photography file (a real Kaggle photo's pixels, no extension, as cameras export)
    goes through the one decoder: prepared exactly as a PNG of the same pixels is."""
    pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")
    import dicom_files as F

    images, _ = _kaggle(shared_data)
    rgb = F.rgb_pixels(images / "10_left.jpeg", side=1024)
    for folder, write in (("dicom", lambda d: F.save(F.build(rgb), d / "IM0001")),
                          ("png", lambda d: Image.fromarray(rgb).save(d / "IM0001.png"))):
        (tmp_path / folder).mkdir()
        write(tmp_path / folder)
    reports = {k: prepare_fundus(tmp_path / k, tmp_path / f"out-{k}", size=96, workers=1, progress=False)
               for k in ("dicom", "png")}
    assert [r.kept for r in reports.values()] == [1, 1] and not reports["dicom"].dropped
    outs = [decode_image(tmp_path / f"out-{k}" / "IM0001.jpeg") for k in ("dicom", "png")]
    assert np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
