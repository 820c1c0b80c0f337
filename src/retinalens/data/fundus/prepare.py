"""`prepare_fundus`: every photograph of a folder (recursively) or of a labels CSV, prepared in parallel
processes, resumably (atomic writes: an existing output is complete), writing only under the destination,
with a report of what was kept, dropped and why."""

from __future__ import annotations

import csv
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from ..._console import progress_bar
from ..._io import atomic_write_bytes, atomic_write_json, sweep_temp_files
from ...errors import RetinaLensError
from ..decode import IMAGE_SUFFIXES, PILLOW_FORMATS, decode_image, is_dicom_file, is_image_file
from ..labels_csv import find_column, image_name, read_rows, resolve_image, search_folders
from .crop import MIN_SIDE, UnusableFundusError, prepare_with_fov

REPORT_NAME = "prepare_report.json"
FORMATS = {"jpeg": ".jpeg", "png": ".png"}


@dataclass
class PrepareReport:
    kept: int = 0                   # outputs present at the end (prepared now + already there)
    skipped_existing: int = 0       # outputs that were already complete and left alone
    prepared: int = 0               # outputs written by this run
    dropped: list[tuple[Path, str]] = field(default_factory=list)  # (source image, reason)
    crop_boxes: dict[str, list[int]] = field(default_factory=dict)  # source name -> box in source pixels
    report_path: Path | None = None


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
    rows, fields = read_rows(csv_path)
    column = find_column(fields, ("image",))
    if column is None:
        raise RetinaLensError(f"{csv_path}: expected an 'image' column, found {', '.join(fields) or 'none'}")
    if dst.resolve() == csv_path.parent.resolve():
        raise RetinaLensError(f"{dst}: the destination must not be the CSV's own folder")
    search = search_folders(csv_path)
    jobs, dropped, names, holders, taken, seen = {}, [], {}, set(), {}, set()
    for row in rows:
        value = (row.get(column) or "").strip()
        if not value or value in seen:  # a name on several rows: one image (all its rows are copied)
            continue
        seen.add(value)
        pure = image_name(value)
        if pure.is_absolute() or ".." in pure.parts:
            dropped.append((Path(value), "image path leaves the images folder (absolute or with '..')"))
            continue
        # any_file: a row naming notes.txt is dropped with the decoder's reason, not as missing
        found = resolve_image(pure, search, any_file=True)
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
        with Image.open(path, formats=PILLOW_FORMATS) as im:
            return im.size == (size, size)
    except (OSError, ValueError, SyntaxError):
        return False


def _run(todo: list[tuple[_Job, bool]], size: int, contrast: bool, fmt: str,
         workers: int | None) -> Iterator[tuple[list[int] | None, str | None]]:
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
        # A DICOM photograph has no draft decoding: what was decoded is the whole image (its header is
        # not one Pillow reads).
        full = img.size if is_dicom_file(source) else _source_size(source)
        if min(full) < MIN_SIDE:
            raise UnusableFundusError(f"too small to be a fundus photograph ({full[0]}x{full[1]} px; "
                                      f"need at least {MIN_SIDE} px a side)")
        out, fov = prepare_with_fov(img, size, contrast)
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
    with Image.open(path, formats=PILLOW_FORMATS) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return w, h
