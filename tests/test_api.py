"""The Python API, one function per command: each does what its command does, on real scans.

Every test runs the command (a real process) and the function on the same input and compares what
they wrote or returned.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import retinalens
from helpers import cli_env, run_cli

COMMANDS = ("extract", "train", "evaluate", "report", "predict", "explain", "export", "serve", "retrain",
            "prepare_fundus", "demo", "backbones")


def test_one_function_per_command_survives_the_subpackages_imports():
    code = f"""
import retinalens, retinalens.api as api
import retinalens.predict.model, retinalens.explain, retinalens.export.formats, retinalens.serve, retinalens.demo
import retinalens.train.retrain, retinalens.evaluate.run
assert all(getattr(retinalens, n) is getattr(api, n) for n in {COMMANDS!r}), [getattr(retinalens, n) for n in {COMMANDS!r}]
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert set(COMMANDS) <= set(retinalens.__all__)


def test_predict_is_predict_many_and_writes_what_the_cli_writes(tmp_path, small_bundle, small_dataset):
    scans = sorted((small_dataset / "test" / "DME").glob("*.jpeg"))
    bad = tmp_path / "bad.jpeg"
    bad.write_text("not an image")
    inputs = [*scans, bad]
    results = retinalens.predict(small_bundle.path, inputs, json_path=tmp_path / "a.json", csv_path=tmp_path / "a.csv")
    assert results == retinalens.load(small_bundle.path).predict_many(inputs)
    assert sum("error" in r for r in results) == 1 and len(results) == len(inputs)
    r = run_cli("predict", small_bundle.path, *inputs, "--json", tmp_path / "b.json", "--csv", tmp_path / "b.csv", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text() == r.stdout  # piped: CSV rows


def _sections(html: str) -> list[str]:
    return re.findall(r"<h2[^>]*>(.*?)</h2>", html)


def test_evaluate_and_report_give_what_the_cli_gives(tmp_path, small_bundle, small_dataset, feature_cache):
    r = run_cli("report", small_bundle.path, small_dataset, "--out", tmp_path / "cli.html", "--n-boot", "50", "-q",
                "--cache", feature_cache)
    assert r.returncode == 0, r.stderr
    m = retinalens.report(small_bundle.path, small_dataset, tmp_path / "api.html", n_boot=50, cache=feature_cache)
    cli_html, api_html = (tmp_path / "cli.html").read_text(), (tmp_path / "api.html").read_text()
    assert len(_sections(api_html)) >= 5 and _sections(api_html) == _sections(cli_html)
    assert f"{m['n_images']} images, accuracy {m['accuracy']:.3f}" in r.stderr

    r = run_cli("evaluate", small_bundle.path, small_dataset, "--json", tmp_path / "m.json", "--n-boot", "50", "-q",
                "--cache", feature_cache)
    assert r.returncode == 0, r.stderr
    cli_m = json.loads((tmp_path / "m.json").read_text())
    api_m = retinalens.evaluate(small_bundle.path, small_dataset, n_boot=50, cache=feature_cache)
    assert api_m["data"]["split"] == cli_m["data"]["split"] == "test"  # the same default split
    for key in ("n_images", "accuracy", "accuracy_ci", "roc_auc_macro", "per_class"):  # the bootstrap is seeded
        assert json.loads(json.dumps(api_m[key])) == cli_m[key], key


def test_explain_writes_the_overlays_the_cli_writes(tmp_path, small_bundle, small_dataset):
    folder = small_dataset / "test" / "CNV"
    seen: list[dict] = []
    done = retinalens.explain(small_bundle.path, folder, out=tmp_path / "api", class_name="CNV", on_result=seen.append)
    assert done == seen and len(done) == len(list(folder.glob("*.jpeg")))
    r = run_cli("explain", small_bundle.path, folder, "--out", tmp_path / "cli", "--class", "CNV")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "api").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(Path(d["png"]).name for d in done)
    for d, line in zip(done, r.stdout.splitlines()):
        assert line.startswith(f"{d['input']} -> ") and f"predicted {d['label']} {d['probability']:.2f}" in line


def test_export_writes_what_the_cli_writes(tmp_path, small_bundle):
    path = retinalens.export(small_bundle.path, out=tmp_path / "api.onnx")
    r = run_cli("export", small_bundle.path, "--out", tmp_path / "cli.onnx")
    assert r.returncode == 0, r.stderr
    api_meta = json.loads((tmp_path / "api.onnx.json").read_text())
    cli_meta = json.loads((tmp_path / "cli.onnx.json").read_text())
    assert path == tmp_path / "api.onnx" and path.stat().st_size > 1_000_000
    assert api_meta.keys() == cli_meta.keys() and api_meta["classes"] == cli_meta["classes"]


def test_train_and_extract_take_the_clis_defaults(tmp_path, small_dataset, feature_cache):
    r = run_cli("train", small_dataset, "--out", tmp_path / "cli", "--epochs", "2", "--seed", "3", "-q",
                "--cache", feature_cache)
    assert r.returncode == 0, r.stderr
    retinalens.train(small_dataset, tmp_path / "api", epochs=2, seed=3, cache=feature_cache)
    assert (json.loads((tmp_path / "api" / "config.json").read_text())
            == json.loads((tmp_path / "cli" / "config.json").read_text()))

    r = run_cli("extract", small_dataset / "test", "--cache", tmp_path / "c", "-q")
    assert r.returncode == 0, r.stderr
    store, report = retinalens.extract(small_dataset / "test", cache=tmp_path / "c")
    assert f"cache: {store.dir} ({len(store)} images)" in r.stderr
    assert report.n_extracted == 0 and report.n_cached == len(store) == 16  # the CLI's run had cached them all
    # OCT scans of the four classes: both views of the default's two-view input, a cache each
    assert "view band of the squash+band input: extracted 16 image(s)" in r.stderr.replace("\n", " ")
    assert "view band of the squash+band input: extracted 0 image(s)" in " ".join(report.notes)


def test_extract_caches_every_view_the_default_train_reads(tmp_path, small_dataset):
    cache = tmp_path / "cache"
    r = run_cli("extract", small_dataset, "--cache", cache, "-q")
    assert r.returncode == 0, r.stderr
    again = run_cli("train", small_dataset, "--out", tmp_path / "b", "--cache", cache, "--head", "logreg", "-q")
    assert again.returncode == 0, again.stderr
    assert "extracted" not in again.stderr  # both members' features came from extract's caches
    assert [m.preprocessing.view for m in retinalens.load_bundle(tmp_path / "b").members] == ["squash", "band"]


def test_backbones_lists_what_the_cli_lists():
    r = run_cli("backbones")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == [s.name for s in retinalens.backbones()]


def test_prepare_fundus_prepares_what_the_cli_prepares(tmp_path, shared_data):
    src = shared_data / "fundus-idrid"
    if not (src / "labels.csv").is_file():
        pytest.skip(f"{src} holds no labels.csv")
    rows = (src / "labels.csv").read_text().splitlines()
    (tmp_path / "in" / "images").mkdir(parents=True)
    for line in rows[1:4]:
        shutil.copy(src / "images" / line.split(",")[0], tmp_path / "in" / "images")
    (tmp_path / "in" / "labels.csv").write_text("\n".join(rows[:4]) + "\n")
    r = run_cli("prepare", "fundus", tmp_path / "in" / "labels.csv", tmp_path / "cli", "--size", "128", "-q")
    assert r.returncode == 0, r.stderr
    report = retinalens.prepare_fundus(tmp_path / "in" / "labels.csv", tmp_path / "api", size=128)
    assert report.kept + len(report.dropped) == 3 and f"prepared {report.kept} images" in r.stderr
    assert (tmp_path / "api" / "labels.csv").read_text() == (tmp_path / "cli" / "labels.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "api" / "images").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cli" / "images").iterdir())


def test_retrain_refuses_what_the_cli_refuses(tmp_path, small_bundle):
    from retinalens.errors import RetinaLensError
    from retinalens.feedback.store import FeedbackStore

    FeedbackStore(tmp_path / "empty.db").close()
    r = run_cli("retrain", small_bundle.path, "--feedback", tmp_path / "empty.db", "--out", tmp_path / "x", "-q")
    assert r.returncode == 2
    with pytest.raises(RetinaLensError) as err:
        retinalens.retrain(small_bundle.path, tmp_path / "empty.db", tmp_path / "y")
    assert f"error: {err.value}" in r.stderr and "confirmed or corrected label" in str(err.value)


def test_serve_serves_the_web_app(tmp_path, small_bundle):
    pytest.importorskip("fastapi")
    code = f"import retinalens; retinalens.serve({str(small_bundle.path)!r}, port=0, db={str(tmp_path / 'f.db')!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cli_env())
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r" on (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "the server did not start"
        with urllib.request.urlopen(url + "/", timeout=60) as page:
            assert page.status == 200 and "RetinaLens" in page.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
