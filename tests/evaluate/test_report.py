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
    model = {
        "backbone": {"name": "efficientnet_lite0"},
        "head": {"type": "linear"},
        "classes": CLASSES,
        "training_data": {"images": 120, "source": "<b>OCT2017</b>"},
        "versions": {"torch": "2.3.0", "retinalens": "0.1.0"},
    }
    extra = [("Notes & caveats", "<p>Already <em>safe</em> HTML.</p>")]
    out = write_html_report(
        tmp_path / "sub" / "report.html", metrics, y_true=y, probs=probs, title="Eval <v1>",
        model=model, curves_csv=curves_csv, extra_sections=extra,
    )
    page = out.read_text(encoding="utf-8")

    assert out == tmp_path / "sub" / "report.html"
    assert page.count("data:image/png;base64,") == 3  # confusion, ROC, training curves
    images = decoded_pngs(page)
    assert len(images) == 3 and all(image.format == "PNG" for image in images)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>Eval &lt;v1&gt;</title>" in page
    assert "efficientnet_lite0" in page and "linear" in page and "torch: 2.3.0" in page
    assert "&lt;b&gt;OCT2017&lt;/b&gt;" in page  # manifest text is escaped
    assert "<h2>Notes &amp; caveats</h2>" in page and "<em>safe</em>" in page  # body kept as HTML
    assert "Research use only, not a medical device." in page
    assert f"{metrics['accuracy']:.3f} ({metrics['accuracy_ci'][0]:.3f}–{metrics['accuracy_ci'][1]:.3f})" in page
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_minimal_report_without_optional_parts(tmp_path: Path, evaluation: tuple) -> None:
    y, probs, _ = evaluation
    metrics = classification_metrics(y, probs, CLASSES, n_boot=0)  # no urgent block, no CIs
    page = write_html_report(tmp_path / "r.html", metrics, y_true=y, probs=probs).read_text(encoding="utf-8")
    assert len(decoded_pngs(page)) == 2  # confusion matrix and ROC curves
    assert "<h2>Model</h2>" not in page and "Training curves" not in page


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
