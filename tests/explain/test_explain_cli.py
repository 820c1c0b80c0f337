"""`retinalens explain` as users run it: a real process on real scans, a folder, a bad file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from helpers import run_cli as cli

def test_explain_folder_and_bad_file(small_bundle, small_dataset: Path, tmp_path: Path) -> None:
    folder = small_dataset / "test" / "DME"
    scans = sorted(folder.glob("*.jpeg"))
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "maps"
    r = cli("explain", small_bundle.path, folder, bad, scans[0], "--out", out, "--batch-size", "3", "--class", "DME")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(scans) + 1  # the folder's scans, then scans[0] once more; the bad file is not there
    written = [Path(line.split(" -> ")[1].split(" (")[0]) for line in lines]
    assert len(set(written)) == len(written)  # the repeated scan gets its own file, nothing overwritten
    for line, png, scan in zip(lines, written, [*scans, scans[0]]):
        assert line.startswith(str(scan)) and "heat map of DME" in line
        with Image.open(png) as image, Image.open(scan) as original:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == original.size
    assert written[-1].name == f"{scans[0].stem}.DME-2.png"
    assert "failed" in r.stderr and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_explain_bad_input_is_one_line(small_bundle, small_dataset: Path, tmp_path: Path) -> None:
    scan = min((small_dataset / "test" / "CNV").glob("*.jpeg"))
    r = cli("explain", small_bundle.path, scan, "--class", "GLAUCOMA", "--out", tmp_path / "maps")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown class 'GLAUCOMA'")
    assert not (tmp_path / "maps").exists()
    r = cli("explain", small_bundle.path, tmp_path / "missing.jpeg", "--out", tmp_path / "maps")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: none of the 1 input(s)")
