"""`retinalens predict` shows the gate's verdict: CSV columns, JSON, and "N of M ungradable"."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_predict_marks_ungradable_images(small_bundle, small_dataset, tmp_path):
    scan = min((small_dataset / "test" / "DME").glob("*.jpeg"))
    dark = tmp_path / "dark.png"
    Image.fromarray((np.asarray(Image.open(scan).convert("L")) * 0.05).astype(np.uint8)).save(dark)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), RETINALENS_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "retinalens.cli.main", "predict", str(small_bundle.path), str(scan),
                        str(dark), "--json", str(tmp_path / "p.json"), "-q"],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    rows = {Path(row["input"]).name: row for row in csv.DictReader(io.StringIO(r.stdout))}  # piped: CSV
    assert rows["dark.png"]["gate"] == "ungradable" and rows["dark.png"]["gate_reason"] == "too_dark"
    assert rows["dark.png"]["label"] == "" and rows["dark.png"]["refer"] == ""
    assert rows[scan.name]["gate"] == "ok" and rows[scan.name]["label"] and rows[scan.name]["refer"] in ("yes", "no")
    assert float(rows[scan.name]["p_referral"]) >= 0
    assert "1 of 2 ungradable (too_dark 1)" in r.stderr
    results = {Path(x["input"]).name: x for x in json.loads((tmp_path / "p.json").read_text())}
    assert results["dark.png"]["gate"]["reason"] == "too_dark" and results["dark.png"]["label"] is None
    assert results[scan.name]["gate"]["ok"] is True
