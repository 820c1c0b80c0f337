"""`evaluate --volumes` on real B-scans: the grouping it says it used, the volume truth, the metrics, the
report's strips, and agreement with `predict --volumes` on the same scans."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from helpers import run_cli
from retinalens.config import VolumeConfig
from retinalens.evaluate.run import evaluate_bundle
from retinalens.predict.model import Model
from retinalens.predict.volume import predict_volumes, volume_inputs


@pytest.fixture(scope="module")
def by_patient(small_bundle, small_dataset, feature_cache, tmp_path_factory):
    report = tmp_path_factory.mktemp("report") / "r.html"
    m = evaluate_bundle(small_bundle, small_dataset, cache=feature_cache, n_boot=200, progress=False,
                        report_path=report, volumes=VolumeConfig(group_by="patient"))
    return m, report.read_text()


def test_volume_metrics_by_patient(by_patient, small_bundle, small_dataset):
    m, _ = by_patient
    v = m["volumes"]
    labels = defaultdict(set)  # patient -> class folders, from the Kermany names themselves
    for f in (small_dataset / "test").glob("*/*.jpeg"):
        labels[f.stem.split("-")[1]].add(f.parent.name)
    assert v["grouping"] == "patient" and "patient id in their names" in v["grouping_note"]
    assert v["n_volumes"] == len(labels) and v["n_mixed_labels"] == sum(len(c) > 1 for c in labels.values()) >= 1
    rows = {r["volume"]: r for r in v["volumes"]}
    # Both urgent and one B-scan each: the tie between the most urgent goes to the name.
    assert rows["1083927"]["true"] == "CNV" and labels["1083927"] == {"CNV", "DME"}
    graded = [r for r in v["volumes"] if r["gradable"]]
    vm = v["metrics"]
    assert vm["n_images"] == len(graded) and m["n_images"] == 16  # the B-scan metrics stay per B-scan
    assert vm["accuracy"] == pytest.approx(sum(r["label"] == r["true"] for r in graded) / len(graded))
    u = vm["urgent_referral"]
    assert u["n_positive"] == sum(r["true"] in ("CNV", "DME") for r in graded)
    assert u["threshold"] == pytest.approx(small_bundle.manifest.referral_threshold.threshold)
    assert len(u["sensitivity_ci"]) == 2 and vm["ci"]["method"].startswith("patient-clustered")


def test_evaluate_and_predict_give_each_volume_the_same_answer(by_patient, small_bundle, small_dataset):
    m, _ = by_patient
    volumes, _ = volume_inputs([small_dataset / "test"], "patient")
    predicted = {r["volume"]: r for r in predict_volumes(Model(small_bundle), volumes)}
    for row in m["volumes"]["volumes"]:
        p = predicted[row["volume"]]
        assert (row["label"], row["refer"], row["index_slice"]) == (p["label"], p["refer"], p["index_slice"])
        assert row["index_input"] == p["slices"][p["index_slice"]]["input"]


def test_report_shows_strips_of_volumes(by_patient):
    m, html = by_patient
    assert "<h2>OCT volumes</h2>" in html and "patient id in their names" in html
    strips = re.findall(r"<h3>([^<]*)</h3><div class=\"strip\">(.*?)</div>", html)
    assert 1 <= len(strips) <= 4
    rows = {r["volume"]: r for r in m["volumes"]["volumes"]}
    wrong = [r for r in rows.values() if r["gradable"] and r["label"] != r["true"]]
    first = rows[strips[0][0].split(":")[0]]
    assert (first["label"] != first["true"]) == bool(wrong)  # misclassified volumes come first
    for head, cells in strips:
        row = rows[head.split(":")[0]]
        assert cells.count("<figure") == row["n_slices"] and cells.count('class="worst"') == 1
        assert f'alt="B-scan {row["index_slice"] + 1}"' in cells.split('class="worst"')[1].split("</figure>")[0]
    assert 'alt="Heat map, B-scan' in html


def test_evaluate_volumes_cli_says_the_grouping(small_bundle, small_dataset, feature_cache):
    r = run_cli("evaluate", small_bundle.path, small_dataset, "--volumes", "--group-by", "folder", "--n-boot", "50",
                "-q", RETINALENS_CACHE=str(feature_cache))
    assert r.returncode == 0, r.stderr
    assert "per volume: B-scans grouped by folder (one acquisition per folder); 4 volumes" in r.stderr
    assert re.search(r"per volume: accuracy \d\.\d{3}", r.stderr)
