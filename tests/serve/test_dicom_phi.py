"""Patient data in DICOM files goes nowhere: a sentinel planted in every identifying tag of real scans
never appears in the CLI's stdout, stderr, JSON, CSV or HTML report, in the web app's responses or
logs, nor in the feedback database or the images it stores (de-identified copies that keep the
pixels). Broken DICOM files get one clear error: exit 2 in the CLI, a 4xx or a per-file error in the
web app. The DICOM Structured Report (`predict --sr-out`) reads back with pydicom and highdicom."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

import dicom_files as F  # noqa: E402
from helpers import assert_clean_error, run_cli  # noqa: E402
from retinalens.data.decode import decode_image  # noqa: E402

# What must not surface: the sentinel (in every text tag) and the birth date (a DA holds no text).
NEEDLES = (F.SENTINEL, "19010101")


def assert_clean(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for needle in NEEDLES:
        assert needle.encode() not in data, f"{needle} found in {where}"


@pytest.fixture(scope="module")
def dicom_export(tmp_path_factory: pytest.TempPathFactory, demo_scans: dict[str, Path]) -> Path:
    """The demo's test scans as DICOM files in class folders (names without extension), sentinel planted."""
    root = tmp_path_factory.mktemp("dicom-export")
    from retinalens.demo import DEMO_DATA

    for cls in demo_scans:
        for k, scan in enumerate(sorted((DEMO_DATA / "test" / cls).glob("*.jpeg"))[:2]):
            F.save(F.build(F.grey_pixels(scan), patient=f"{F.SENTINEL}-{cls}-{k}"), root / cls / f"IM{k:04d}")
    return root


def test_cli_outputs_hold_no_identifiers(tmp_path: Path, small_bundle, dicom_export: Path) -> None:
    out = {k: tmp_path / f"out.{k}" for k in ("json", "csv", "parquet")}
    r = run_cli("predict", small_bundle.path, dicom_export, "--json", out["json"], "--csv", out["csv"],
                "--out", out["parquet"], "--sr-out", tmp_path / "sr", "--quiet")
    assert r.returncode == 0, r.stderr
    results = json.loads(out["json"].read_text())
    assert len(results) == 8 and not [r for r in results if "error" in r]  # every file was read
    assert len({r["patient"] for r in results}) == 8 and all(r["patient"].startswith("p-") for r in results)
    assert {r["laterality"] for r in results} == {"R"} and "patient" in out["csv"].read_text().splitlines()[0]
    import pyarrow.parquet as pq

    table = pq.read_table(out["parquet"])  # values and schema metadata as read back (the file is compressed)
    assert table.num_rows == 8
    parquet_text = repr(table.to_pylist()) + repr(table.schema.metadata)
    for name, text in (("stdout", r.stdout), ("stderr", r.stderr), ("JSON", out["json"].read_text()),
                       ("CSV", out["csv"].read_text()), ("Parquet", parquet_text)):
        assert_clean(text, f"predict {name}")
    reports = sorted((tmp_path / "sr").glob("*.dcm"))
    assert len(reports) == 8
    _check_sr(reports[0], small_bundle)


def test_evaluation_outputs_hold_no_identifiers(tmp_path: Path, small_bundle, dicom_export: Path, capfd, caplog) -> None:
    from retinalens.api import evaluate

    caplog.set_level(logging.DEBUG)
    metrics, report = tmp_path / "metrics.json", tmp_path / "report.html"
    m = evaluate(small_bundle.path, dicom_export, json_path=metrics, report_path=report, n_boot=20)
    assert m["failures"] == []  # every DICOM file was read
    captured = capfd.readouterr()
    for name, text in (("output", captured.out + captured.err + caplog.text), ("JSON", metrics.read_text()),
                       ("HTML report", report.read_text())):
        assert_clean(text, f"evaluate {name}")


def test_keep_identifiers_gives_the_tags_values(small_bundle, dicom_export: Path) -> None:
    from retinalens.api import predict
    from retinalens.predict.model import load

    one, model = dicom_export / "CNV" / "IM0000", load(small_bundle.path)
    (kept,) = predict(model, one, keep_identifiers=True)
    assert kept["patient"] == f"{F.SENTINEL}-CNV-0"  # asked for: the sentinel shows, so the checks above can fail
    (plain,) = predict(model, one)
    assert plain["patient"].startswith("p-") and F.SENTINEL not in json.dumps(plain)


def _check_sr(path: Path, bundle) -> None:
    """The SR reads back (pydicom, highdicom), refers to its source instance and holds the finding."""
    import highdicom as hd
    import pydicom

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    sr = hd.sr.srread(path)
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
    finding = items["Finding"].ConceptCodeSequence[0].CodeValue
    assert finding in (*bundle.manifest.classes, "UNGRADABLE")
    source_uid = items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_uid
    probs = [float(i.MeasuredValueSequence[0].NumericValue) for k, i in items.items() if k.startswith("Probability")]
    assert len(probs) == len(bundle.manifest.classes) and abs(sum(probs) - 1) < 1e-3


def test_broken_dicom_is_one_clear_error_in_the_cli(tmp_path: Path, small_bundle, demo_scans) -> None:
    grey = F.grey_pixels(demo_scans["CNV"])
    good = F.save(F.build(grey), tmp_path / "good").read_bytes()
    (tmp_path / "cut").write_bytes(good[:len(good) // 2])
    r = run_cli("predict", small_bundle.path, tmp_path / "cut", "--quiet")
    assert_clean_error(r, "pixel data ends after")
    assert_clean(r.stdout + r.stderr, "the error of a truncated file")


def test_web_app_keeps_identifiers_out(client, live_app, serve_dir: Path, demo_scans, caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)
    grey = F.grey_pixels(demo_scans["DME"])
    dicom = F.save(F.build(grey), serve_dir.parent / "phi-upload").read_bytes()
    cut = dicom[:len(dicom) // 2]
    bomb = F.save(F.build(np.stack([grey[:8, :8]] * 2), sop_class=F.OPT, frames=10**9), serve_dir.parent / "bomb")
    opt = F.save(F.build(np.stack([grey] * 2), sop_class=F.OPT), serve_dir.parent / "phi-volume").read_bytes()
    responses = []
    r = client.post("/api/predict", files=[("files", ("a", dicom, "application/dicom")),
                                           ("files", ("b", cut, "application/octet-stream")),
                                           ("files", ("v", opt, "application/dicom"))])  # a volume by itself
    assert r.status_code == 200, r.text
    responses.append(r.text)
    good, bad = r.json()["results"]
    assert [len(v["results"]) for v in r.json()["volumes"]] == [2]
    assert "id" in good and "pixel data ends after" in bad["error"] and "id" not in bad
    for path in (f"/api/analyses/{good['id']}", f"/api/analyses/{good['id']}/heatmap.png"):
        got = client.get(path)
        assert got.status_code == 200
        responses.append(got.content)
    r = client.post("/api/feedback", json={"analysis_id": good["id"], "label": "DME"})
    assert r.status_code == 200, r.text
    responses.append(r.text)
    r = client.post("/api/predict", files=[("files", ("c", bomb.read_bytes(), "application/dicom"))])
    assert r.status_code == 413 and "frames" in r.json()["detail"]
    responses.append(r.text)
    for text in responses:
        assert_clean(text, "a web response")
    stored = [p for p in serve_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".dcm") for p in stored)
    for p in stored:  # the database (and its journal) and every stored image
        assert_clean(p.read_bytes(), f"the feedback store ({p.name})")
    copy = next(p for p in stored if p.name.endswith(".dcm"))
    assert np.array_equal(np.asarray(decode_image(copy)), np.asarray(decode_image(dicom)))  # pixels kept
    import pydicom

    assert pydicom.dcmread(copy).PatientIdentityRemoved == "YES"
    captured = capfd.readouterr()
    assert_clean(captured.out + captured.err + caplog.text, "the server's logs")
