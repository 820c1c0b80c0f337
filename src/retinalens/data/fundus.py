"""Prepare colour fundus photographs: find the circular field of view, crop the black border, square, resize.

Fundus cameras (Kaggle 2015 / EyePACS, IDRiD) record a bright disc on a black background, often cut
by the frame at the top and bottom. `find_fov` locates the disc on a downscaled copy, `prepare_image`
crops it, pads it to a square (black, the disc centred) and resizes it, optionally with Graham's
contrast normalisation (Kaggle 2015 winner). `prepare_fundus` does a folder or a labels CSV in
parallel, resumably, writing only under the destination.

Threshold. Background brightness differs between cameras (Kaggle: 0-3; IDRiD: a glow up to ~30 round
the disc) and so does the brightness of the disc's rim (a dim rim of 15-25 in some Kaggle photos), so
no fixed level or fraction of the peak works for all. The disc's edge is a sharp step, though: the
number of pixels above a level t barely changes while t crosses that step (the gap between the
background and the rim) and changes fast inside the background and inside the disc. We take the
lowest level of that stable stretch (a maximally stable region, read off the histogram in
microseconds), step half-way up, and take the largest connected region above it (scipy.ndimage;
scipy comes with scikit-learn). Measured on the shared Kaggle and IDRiD photos: see tests/data/test_fundus.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
from PIL import Image

from .._console import progress_bar
from .._io import atomic_write_bytes, atomic_write_json, sweep_temp_files
from ..errors import RetinaLensError
from .decode import IMAGE_SUFFIXES, decode_image, is_image_file

MIN_SIDE = 128             # px: smaller than any fundus camera's output; a thumbnail or an icon
MIN_FOV_FRACTION = 0.10    # a field of view under 10% of the frame is a failed photo, not a fundus
MIN_PEAK = 40              # brightest 1% of pixels below this (of 255): near-black, nothing to see
WORK_SIDE = 1024           # find_fov works on a copy at most this long (integer box reduction)
_STEP = 6                  # levels over which the pixel count above a threshold must stay stable
_STABLE_SLACK = 0.005      # a level is "stable" when its loss is within 0.5% of the most stable one
_CONTRAST_RIM = 0.98       # contrast mode keeps this share of the radius: the rim's half-lit pixels go
REPORT_NAME = "prepare_report.json"
FORMATS = {"jpeg": ".jpeg", "png": ".png"}


class UnusableFundusError(RetinaLensError):
    """A readable image that is not a usable fundus photograph (black, tiny, field of view too small)."""


@dataclass(frozen=True)
class FOV:
    """The circular field of view, in pixels of the image given to `find_fov`."""

    box: tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive), clipped to the image
    centre: tuple[float, float]     # x, y of the disc's centre (may lie outside the box when cut by the frame)
    radius: float                   # estimated radius of the whole disc, also the part cut off by the frame
    fraction: float                 # share of the image's pixels inside the field of view


@dataclass
class PrepareReport:
    kept: int = 0                   # outputs present at the end (prepared now + already there)
    skipped_existing: int = 0       # outputs that were already complete and left alone
    prepared: int = 0               # outputs written by this run
    dropped: list[tuple[Path, str]] = field(default_factory=list)  # (source image, reason)
    crop_boxes: dict[str, list[int]] = field(default_factory=dict)  # source name -> box in source pixels
    report_path: Path | None = None


# -- one image -----------------------------------------------------------------------------------

def find_fov(img: Image.Image) -> FOV | None:
    """The field of view of a fundus photograph, or None when the image is (nearly) black."""
    from scipy import ndimage as ndi

    img = img.convert("RGB")
    width, height = img.size
    k = max(1, math.ceil(max(width, height) / WORK_SIDE))
    a = np.asarray(img.reduce(k) if k > 1 else img)
    # Max over channels: the background is black in all three, the disc bright in at least one
    # (red in most photos, not in every camera's white balance). The median drops JPEG specks.
    v = _median3(np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2]))
    hist = np.bincount(v.ravel(), minlength=256)
    p99 = int(np.searchsorted(hist.cumsum(), 0.99 * v.size))
    if p99 < MIN_PEAK:
        return None
    labels, n = ndi.label(v > _stable_threshold(hist, p99))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    region = labels == sizes.argmax()
    h, w = region.shape
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)  # working pixels
    # Row by row, the span from the leftmost to the rightmost disc pixel: the disc without its holes
    # (a dark lesion is still field of view), and the edge points the circle is fitted to.
    sub = region[rows]
    first = sub.argmax(axis=1)
    last = w - 1 - sub[:, ::-1].argmax(axis=1)
    area = float((last - first + 1).sum())
    cx, cy, r = _fit_circle(region, rows, first, last, cols, box)
    # Working pixels back to the image's; one block of margin when reduced (a block half inside the
    # disc may average below the threshold).
    pad = k if k > 1 else 0
    l, t, rr, b = box
    return FOV((max(0, l * k - pad), max(0, t * k - pad), min(width, rr * k + pad), min(height, b * k + pad)),
               (float(cx * k), float(cy * k)), float(r * k), area / (h * w))


def _median3(v: np.ndarray) -> np.ndarray:
    """3x3 separable median (a row median of 3, then a column median of 3): kills specks, keeps edges."""
    def med(x: np.ndarray, axis: int) -> np.ndarray:
        p = np.pad(x, [(1, 1) if i == axis else (0, 0) for i in range(2)], mode="edge")
        lo, mid, hi = (p[i:i + x.shape[0]] if axis == 0 else p[:, i:i + x.shape[1]] for i in range(3))
        return np.maximum(np.minimum(lo, mid), np.minimum(np.maximum(lo, mid), hi))
    return med(med(v, 1), 0)


def _stable_threshold(hist: np.ndarray, p99: int) -> int:
    """The lowest level of the stable stretch between background and disc (see the module docstring)."""
    count = hist[::-1].cumsum()[::-1][1:].astype(np.float64)  # count[t]: pixels brighter than t
    count = np.append(count, np.zeros(_STEP + 1))
    lo, hi = 4, int(min(100, 0.4 * p99))
    if hi <= lo:
        return lo + _STEP // 2
    t = np.arange(lo, hi + 1)
    loss = (count[t] - count[t + _STEP]) / np.maximum(count[t], 1)
    first = int(t[np.argmax(loss <= loss.min() + _STABLE_SLACK)])
    return first + _STEP // 2  # the middle of the step, clear of the background's brightest pixels


def _fit_circle(region: np.ndarray, rows: np.ndarray, first: np.ndarray, last: np.ndarray,
                cols: np.ndarray, box: tuple[int, int, int, int]) -> tuple[float, float, float]:
    """Centre and radius of the disc (working pixels, continuous coordinates): a least-squares circle
    through the region's edge where the frame does not cut it, else the box's own circle."""
    h, w = region.shape
    l, t, r, b = box
    fallback = ((l + r) / 2, (t + b) / 2, max(r - l, b - t) / 2)
    sub = region[:, cols]
    top = sub.argmax(axis=0)
    bottom = h - 1 - sub[::-1].argmax(axis=0)
    xs = [first[first > 0], last[last < w - 1] + 1.0, cols[top > 0] + 0.5, cols[bottom < h - 1] + 0.5]
    ys = [rows[first > 0] + 0.5, rows[last < w - 1] + 0.5, top[top > 0], bottom[bottom < h - 1] + 1.0]
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)
    if len(x) < 20:
        return fallback
    for _ in range(3):  # fit, drop the points far off (a camera's notch, a flat side), fit again
        a = np.column_stack([x, y, np.ones_like(x)])
        (p, q, c), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
        cx, cy = p / 2, q / 2
        radius = math.sqrt(max(c + cx * cx + cy * cy, 0.0))
        resid = np.abs(np.hypot(x - cx, y - cy) - radius)
        keep = resid <= max(3 * float(np.median(resid)), 1.5)
        if keep.all() or keep.sum() < 20:
            break
        x, y = x[keep], y[keep]
    # A circle much smaller than the region, or huge (a straight edge), is a bad fit.
    if not (0.4 * max(r - l, b - t) <= radius <= 1.5 * math.hypot(w, h)):
        return fallback
    return cx, cy, radius


def prepare_image(img: Image.Image, size: int = 256, contrast: bool = False) -> Image.Image:
    """Crop `img` to its field of view, pad to a square, resize to size x size.

    Raises UnusableFundusError (a RetinaLensError) with the reason for an image that is not a usable
    fundus photograph."""
    return _prepare(img, size, contrast)[0]


def _prepare(img: Image.Image, size: int, contrast: bool) -> tuple[Image.Image, FOV]:
    img = img.convert("RGB")
    width, height = img.size
    if min(width, height) < MIN_SIDE:
        raise UnusableFundusError(f"too small to be a fundus photograph ({width}x{height} px; "
                                  f"need at least {MIN_SIDE} px a side)")
    fov = find_fov(img)
    if fov is None:
        raise UnusableFundusError(f"near-black: no field of view found (brightest 1% of pixels below {MIN_PEAK}/255)")
    if fov.fraction < MIN_FOV_FRACTION:
        raise UnusableFundusError(f"field of view too small ({fov.fraction:.1%} of the image; "
                                  f"need at least {MIN_FOV_FRACTION:.0%})")
    left, top, right, bottom = fov.box
    side = max(right - left, bottom - top)
    scale = size / side
    nw, nh = max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))
    part = img.resize((nw, nh), Image.Resampling.LANCZOS, box=fov.box)
    # Pad so that the disc's centre lands in the middle: a disc cut at the top gets its black above.
    ox = min(max(round(size / 2 - (fov.centre[0] - left) * scale), 0), size - nw)
    oy = min(max(round(size / 2 - (fov.centre[1] - top) * scale), 0), size - nh)
    out = Image.new("RGB", (size, size))
    out.paste(part, (ox, oy))
    if contrast:
        centre = (ox + (fov.centre[0] - left) * scale, oy + (fov.centre[1] - top) * scale)
        out = _graham(out, centre, fov.radius * scale * _CONTRAST_RIM, (ox, oy, ox + nw, oy + nh))
    return out, fov


def _graham(img: Image.Image, centre: tuple[float, float], radius: float, content: tuple[int, int, int, int]) -> Image.Image:
    """4*img - 4*GaussianBlur(img, size/30) + 128 inside the disc, black outside (Graham, Kaggle 2015).

    The local average is taken over the disc only (blur of img*mask / blur of mask), so that the
    black outside does not pull it down near the rim: no bright ring, no need to drop the outer 10%
    of the disc as the original did."""
    from scipy import ndimage as ndi

    size = img.size[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mask = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2
    l, t, r, b = content
    inside = np.zeros_like(mask)
    inside[t:b, l:r] = True
    mask &= inside  # the disc where the photo has it: not the padding that stands for the cut-off part
    a = np.asarray(img, dtype=np.float32)
    m = mask.astype(np.float32)
    sigma = size / 30
    num = ndi.gaussian_filter(a * m[..., None], sigma=(sigma, sigma, 0))
    den = ndi.gaussian_filter(m, sigma=sigma)[..., None]
    local = num / np.maximum(den, 1e-6)
    out = np.clip(4 * a - 4 * local + 128, 0, 255) * m[..., None]
    return Image.fromarray(np.rint(out).astype(np.uint8))


# -- a folder or a CSV ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    source: Path
    name: str        # the source as the report names it (relative to SRC or the CSV's image folder)
    output: Path


def prepare_fundus(src: str | Path, dst: str | Path, size: int = 256, contrast: bool = False,
                   workers: int | None = None, progress: bool = True, fmt: str = "jpeg") -> PrepareReport:
    """Prepare every fundus photograph of `src` (a folder, recursively, or a labels CSV) into `dst`.

    A folder's tree is mirrored under `dst`; a CSV's images go to dst/images and the rows of the kept
    ones to dst/labels.csv. Outputs that already exist are skipped (every write is atomic, so an
    existing file is complete); dropped images are listed with their reason in the report and in
    dst/prepare_report.json. Nothing is written outside `dst`."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if fmt not in FORMATS:
        raise RetinaLensError(f"unknown format {fmt!r} (expected {' or '.join(FORMATS)})")
    if size < 16:
        raise RetinaLensError(f"--size {size} is too small (at least 16)")
    if not src.exists():
        raise RetinaLensError(f"{src}: no such file or folder")
    if src.is_file() and src.suffix.lower() != ".csv":
        raise RetinaLensError(f"{src}: expected a folder of fundus photographs or a labels CSV")
    settings = {"size": size, "contrast": contrast, "format": fmt}
    if src.is_dir():
        _refuse_overlap(src, dst)
        layout, csv_info = "folder", None
        jobs, dropped = _folder_jobs(src, dst, FORMATS[fmt])
    else:
        layout = "csv"
        jobs, dropped, csv_info = _csv_jobs(src, dst, FORMATS[fmt])
    if not jobs:
        raise RetinaLensError(f"{src}: no images found" + (f" ({len(dropped)} named but missing)" if dropped else ""))
    previous = _previous_boxes(dst / REPORT_NAME, settings)
    atomic_write_json(dst / REPORT_NAME, {"source": str(src), "layout": layout, "settings": settings,
                                          "complete": False, "crop_boxes": previous})
    for folder in {j.output.parent for j in jobs}:
        if folder.is_dir():
            sweep_temp_files(folder)

    n_images = len(jobs) + len(dropped)  # dropped so far: named in the CSV but missing, or a duplicate name
    report = PrepareReport(dropped=list(dropped), report_path=dst / REPORT_NAME)
    done = [j for j in jobs if _complete(j.output, size)]
    done_set = set(done)
    todo = [(j, True) for j in jobs if j not in done_set]
    todo += [(j, False) for j in done if j.name not in previous]  # a killed run's outputs: find their boxes
    report.skipped_existing = len(done)
    report.crop_boxes = {j.name: previous[j.name] for j in done if j.name in previous}
    with progress_bar(len(jobs), "prepare fundus", progress, unit="img") as advance:
        advance(len(done) - sum(1 for _, write in todo if not write))
        for (job, write), (box, reason) in zip(todo, _run(todo, size, contrast, fmt, workers)):
            if reason is not None:
                report.dropped.append((job.source, reason))
            else:
                report.crop_boxes[job.name] = box
                report.prepared += write
            advance(1)
    kept = [j for j in jobs if j.name in report.crop_boxes]
    report.kept = len(kept)
    report.dropped.sort(key=lambda d: str(d[0]))
    report.crop_boxes = dict(sorted(report.crop_boxes.items()))
    if csv_info is not None:
        _write_labels(dst / "labels.csv", csv_info, {j.name for j in kept})
    atomic_write_json(dst / REPORT_NAME, {
        "source": str(src), "layout": layout, "settings": settings, "complete": True,
        "counts": {"images": n_images, "kept": report.kept, "prepared": report.prepared,
                   "skipped_existing": report.skipped_existing, "dropped": len(report.dropped)},
        "dropped": [{"image": str(p), "reason": r} for p, r in report.dropped],
        "crop_boxes": report.crop_boxes,
    })
    return report


def _refuse_overlap(source_dir: Path, dst: Path) -> None:
    """Write only under DST, never in the source: refuse DST equal to, inside, or around the source."""
    s, d = source_dir.resolve(), dst.resolve()
    if s == d or s in d.parents:
        raise RetinaLensError(f"{dst}: the destination must not be the source {source_dir} or inside it "
                              "(the source is never written to)")
    if d in s.parents:
        raise RetinaLensError(f"{dst}: the destination must not contain the source {source_dir}")


def _folder_jobs(src: Path, dst: Path, suffix: str) -> tuple[list[_Job], list[tuple[Path, str]]]:
    jobs, dropped, taken = [], [], {}
    for path in sorted(p for p in src.rglob("*") if p.is_file() and is_image_file(p)):
        rel = path.relative_to(src)
        out = dst / rel.with_suffix(suffix)
        if out in taken:  # a.png and a.jpg in one folder: the output keeps the stem, so only one can
            dropped.append((path, f"same output name as {taken[out]} ({out.name})"))
            continue
        taken[out] = rel.as_posix()
        jobs.append(_Job(path, rel.as_posix(), out))
    return jobs, dropped


def _csv_jobs(csv_path: Path, dst: Path, suffix: str) -> tuple[list[_Job], list[tuple[Path, str]], dict[str, Any]]:
    """Jobs for a labels CSV (`image,...`; images in the CSV's images/ folder or next to it)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RetinaLensError(f"{csv_path}: cannot read CSV ({exc})") from None
    column = next((c for c in fields if c and c.strip().lower() == "image"), None)
    if column is None:
        raise RetinaLensError(f"{csv_path}: expected an 'image' column, found {', '.join(fields) or 'none'}")
    if dst.resolve() == csv_path.parent.resolve():
        raise RetinaLensError(f"{dst}: the destination must not be the CSV's own folder")
    search = [csv_path.parent / "images", csv_path.parent]
    jobs, dropped, names, holders, taken, seen = {}, [], {}, set(), {}, set()
    for row in rows:
        value = (row.get(column) or "").strip()
        if not value or value in seen:  # a name on several rows: one image (all its rows are copied)
            continue
        seen.add(value)
        pure = PurePosixPath(value.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts:
            dropped.append((Path(value), "image path leaves the images folder (absolute or with '..')"))
            continue
        found = _resolve(pure, search)
        if found is None:
            dropped.append((csv_path.parent / value, "not found (looked in images/ and next to the CSV)"))
            continue
        holder, found = found
        holders.add(holder)
        has_suffix = pure.suffix.lower() in IMAGE_SUFFIXES
        out_name = (pure.with_suffix(suffix) if has_suffix else pure.with_name(pure.name + suffix)).as_posix()
        if taken.setdefault(out_name, value) != value:  # rows a.jpg and a.png: one output name
            dropped.append((found, f"same output name as {taken[out_name]} ({out_name})"))
            continue
        names[value] = out_name if has_suffix else value  # how labels.csv names it (discover adds suffixes)
        jobs[value] = _Job(found, value, dst / "images" / out_name)
    for folder in holders:
        _refuse_overlap(folder, dst)  # the folders that hold the source images
    return list(jobs.values()), dropped, {"fields": fields, "column": column, "rows": rows, "names": names}


def _resolve(name: PurePosixPath, search: Iterable[Path]) -> tuple[Path, Path] | None:
    """(the search folder, the file) for a CSV's image name, as `discover` resolves it."""
    for folder in search:
        p = folder / name
        if p.is_file():
            return folder, p
        for suffix in (".jpeg", ".jpg", ".png", ".tif", ".tiff"):  # Kaggle's CSV names images without extension
            if (q := p.with_name(p.name + suffix)).is_file():
                return folder, q
    return None


def _write_labels(path: Path, csv_info: dict[str, Any], kept: set[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_info["fields"], lineterminator="\n")
    writer.writeheader()
    column, names = csv_info["column"], csv_info["names"]
    for row in csv_info["rows"]:
        value = (row.get(column) or "").strip()
        if value in kept:
            writer.writerow({**row, column: names[value]})
    atomic_write_bytes(path, buf.getvalue().encode())


def _previous_boxes(report_path: Path, settings: dict[str, Any]) -> dict[str, list[int]]:
    """Crop boxes of an earlier run into the same DST; refuses a DST prepared with other settings."""
    if not report_path.is_file():
        return {}
    try:
        old = json.loads(report_path.read_text())
        old_settings, boxes = old["settings"], old.get("crop_boxes") or {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if old_settings != settings:
        said = ", ".join(f"{k}={v}" for k, v in old_settings.items())
        raise RetinaLensError(f"{report_path.parent}: already holds images prepared with {said}; "
                              "use another destination or delete it")
    return boxes


def _complete(path: Path, size: int) -> bool:
    """An output written by an earlier run (atomic writes: existing means whole) of the right size."""
    try:
        with Image.open(path) as im:
            return im.size == (size, size)
    except (OSError, ValueError, SyntaxError):
        return False


def _run(todo: list[tuple[_Job, bool]], size: int, contrast: bool, fmt: str, workers: int | None):
    """(box, reason) for each job, in order, over `workers` processes (default: every core)."""
    args = [(job.source, job.output, size, contrast, fmt, write) for job, write in todo]
    workers = max(1, min(workers or os.cpu_count() or 1, len(args)))
    if workers == 1:
        yield from map(_process, args)
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(_process, args, chunksize=max(1, min(8, len(args) // (workers * 4))))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _process(args: tuple[Path, Path, int, bool, str, bool]) -> tuple[list[int] | None, str | None]:
    """One image, in a worker: decode, prepare, write atomically. Returns (crop box in source pixels,
    None) or (None, reason); a bad image never stops the batch."""
    source, output, size, contrast, fmt, write = args
    try:
        # JPEG draft decoding (1/2..1/8 in the decoder) to at least twice the output: fast on
        # 4000-px originals, and the LANCZOS resize that follows still sees every output pixel's area.
        img = decode_image(source, draft_size=max(2 * size, MIN_SIDE))
        full = _source_size(source)
        if min(full) < MIN_SIDE:
            raise UnusableFundusError(f"too small to be a fundus photograph ({full[0]}x{full[1]} px; "
                                      f"need at least {MIN_SIDE} px a side)")
        out, fov = _prepare(img, size, contrast)
        if write:
            buf = io.BytesIO()
            if fmt == "jpeg":
                out.save(buf, "JPEG", quality=95, subsampling=0)  # 4:4:4: red lesions on red keep their edges
            else:
                out.save(buf, "PNG")
            atomic_write_bytes(output, buf.getvalue())
        sx, sy = full[0] / img.width, full[1] / img.height
        l, t, r, b = fov.box
        return [round(l * sx), round(t * sy), min(full[0], round(r * sx)), min(full[1], round(b * sy))], None
    except RetinaLensError as exc:
        reason = str(exc)
        prefix = f"{source}: "
        return None, reason[len(prefix):] if reason.startswith(prefix) else reason
    except Exception as exc:  # noqa: BLE001 - a batch goes on; the report names the error
        return None, f"unexpected error: {type(exc).__name__}: {exc}"


def _source_size(path: Path) -> tuple[int, int]:
    """Width and height of the file as decoded (EXIF orientation applied), from its header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return w, h
