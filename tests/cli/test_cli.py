"""The command line as users and scripts run it: real processes, real files, exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_clean_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: object, cache: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, **({"RETINALENS_CACHE": str(cache)} if cache else {}))


def test_train_evaluate_predict_round_trip(tmp_path, small_dataset, feature_cache):
    bundle = tmp_path / "model"
    r = cli("train", small_dataset, "--out", bundle, "--epochs", "5", "--seed", "1", "-q", cache=feature_cache)
    assert r.returncode == 0, r.stderr
    assert json.loads((bundle / "manifest.json").read_text())["training"]["config"]["train"]["seed"] == 1

    r = cli("evaluate", bundle, small_dataset, "--json", tmp_path / "m.json", "--report", tmp_path / "r.html",
            "--n-boot", "100", "-q", cache=feature_cache)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_images"] == 16 and f"accuracy {m['accuracy']:.3f}" in r.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000

    bad = tmp_path / "not-an-image.jpeg"
    bad.write_text("hello")
    r = cli("predict", bundle, small_dataset / "test" / "CNV", bad, "--json", tmp_path / "p.json",
            "--csv", tmp_path / "p.csv", "-q")
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "p.json").read_text())
    assert len(results) == 5 and sum("error" in x for x in results) == 1
    ok = [x for x in results if "error" not in x]
    assert all({"input", "label", "probabilities", "referral"} <= set(x) for x in ok)
    assert "not an image" in r.stderr and "failed" in r.stderr
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "input,label,referral,p_CNV,p_DME,p_DRUSEN,p_NORMAL,p_referral,refer,gate,gate_reason,error"


def test_extract_reports_bad_files_and_goes_on(tmp_path, small_dataset):
    data = tmp_path / "d"
    for cls in ("CNV", "NORMAL"):
        (data / cls).mkdir(parents=True)
        for f in sorted((small_dataset / "train" / cls).glob("*.jpeg"))[:2]:
            (data / cls / f.name).write_bytes(f.read_bytes())
    (data / "CNV" / "CNV-1-1.jpeg").write_bytes(b"")
    r = cli("extract", data, "--cache", tmp_path / "c", "-q")
    assert r.returncode == 0, r.stderr
    assert "CNV-1-1.jpeg" in r.stderr and "(4 images)" in r.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "no-classes", "one-class", "csv-missing", "backbone", "head"])
def test_bad_input_is_one_clear_line(case, tmp_path, small_dataset):
    out = ["--out", tmp_path / "b", "--epochs", "1", "-q"]
    scan = sorted((small_dataset / "train" / "CNV").glob("*.jpeg"))[0]
    if case == "missing":
        assert_clean_error(cli("train", tmp_path / "nope", *out), "no such file")
    elif case == "empty":
        (tmp_path / "e").mkdir()
        assert_clean_error(cli("train", tmp_path / "e", *out), "no images")
    elif case == "no-classes":
        (tmp_path / "flat").mkdir()
        (tmp_path / "flat" / scan.name).write_bytes(scan.read_bytes())
        assert_clean_error(cli("train", tmp_path / "flat", *out), "class folders")
    elif case == "one-class":
        (tmp_path / "one" / "CNV").mkdir(parents=True)
        (tmp_path / "one" / "CNV" / scan.name).write_bytes(scan.read_bytes())
        assert_clean_error(cli("train", tmp_path / "one", *out), "single class")
    elif case == "csv-missing":
        (tmp_path / "labels.csv").write_text("image,label\nmissing1.jpeg,CNV\nmissing2.jpeg,NORMAL\n")
        assert_clean_error(cli("train", tmp_path / "labels.csv", *out), "missing1.jpeg")
    elif case == "backbone":
        assert_clean_error(cli("train", small_dataset, "--backbone", "no_such_net", *out), "unknown backbone")
    elif case == "head":
        assert_clean_error(cli("train", small_dataset, "--head", "bogus", *out, "--cache", tmp_path / "c"), "unknown head")


def test_bad_bundles_are_clear_errors(tmp_path, small_bundle, small_dataset):
    assert_clean_error(cli("predict", tmp_path, small_dataset / "test"), "not a RetinaLens model bundle")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in small_bundle.path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = bytearray((broken / "head.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "head.safetensors").write_bytes(bytes(data))
    assert_clean_error(cli("evaluate", broken, small_dataset), "does not match its hash")


def test_bundle_backbone_must_match_the_cache(tmp_path, small_bundle, small_dataset):
    cache = tmp_path / "c"
    r = cli("extract", small_dataset / "test", "--cache", cache, "--random-weights", "--resize", "squash", "-q")
    assert r.returncode == 0, r.stderr
    [leaf] = [p for p in cache.iterdir() if p.is_dir()]
    assert_clean_error(cli("evaluate", small_bundle.path, small_dataset, "--cache", leaf), "feature cache")


def test_help_lists_the_commands():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("extract", "train", "evaluate", "predict", "demo"):
        assert cmd in r.stdout


def test_output_paths_that_cannot_be_written_are_clear_errors(tmp_path, small_bundle, small_dataset):
    (tmp_path / "taken").mkdir()
    scans = small_dataset / "test" / "CNV"
    assert_clean_error(cli("predict", small_bundle.path, scans, "--json", tmp_path / "taken", "-q"), "cannot write")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    assert_clean_error(cli("train", small_dataset, "--out", tmp_path / "docs", "-q"), "not a RetinaLens bundle")
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_ctrl_c_says_so_and_keeps_the_work(tmp_path, oct_root):
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    # 748 scans are three cache chunks (one view: the squash): interrupted after the first is committed, mid-way through the rest
    # SIGINT at its default in the child: a suite started in the background (`pytest &`) ignores it, and
    # Python keeps an ignored SIGINT ignored, so Ctrl-C would never reach the command.
    proc = subprocess.Popen([sys.executable, "-m", "retinalens.cli.main", "extract", str(oct_root),
                             "--cache", str(tmp_path / "c"), "--resize", "squash"], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "c").glob("*/chunk-*.json")):
        time.sleep(0.2)  # wait for the first committed chunk
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    r = cli("extract", oct_root, "--cache", tmp_path / "c", "--resize", "squash", "-q")
    assert r.returncode == 0 and "256 already cached" in r.stderr, r.stderr  # the rerun continues
