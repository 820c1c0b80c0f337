"""The model card: MODEL_CARD.md in every trained bundle, rewritten by evaluate, escaped everywhere."""

from __future__ import annotations

import json
import re
import shutil

from retinalens.bundle.card import (CARD_FILE, bundle_card, card_html, card_markdown, fmt, model_card,
                                    referral_label, served_card_markdown)
from retinalens.bundle.store import OCT_REFERRAL, load_bundle
from retinalens.data.tasks import TASKS

# The model-card template's sections (Mitchell et al. 2019) that apply to these models.
SECTIONS = ("Model details", "Intended use", "Training data", "Evaluation data", "Metrics", "Operating point",
            "Calibration", "Quality gate", "Ethical considerations and limits", "Caveats and recommendations")


def headings(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.M)


def test_a_trained_bundle_has_its_card(small_bundle) -> None:
    text = (small_bundle.path / CARD_FILE).read_text(encoding="utf-8")
    document = small_bundle.manifest.to_dict()
    assert text.startswith(f"# Model card: {small_bundle.path.name}\n")
    assert headings(text) == list(SECTIONS)
    assert small_bundle.manifest_sha256 in text  # the card names the very weights it describes
    val = document["validation"]
    assert f"| Accuracy | {fmt(val['accuracy'], val['accuracy_ci'])} |" in text
    train = document["training"]["splits"]["train"]
    assert f"| train | {train['n_images']} | {train['n_patients']} |" in text  # patient counts per split
    # (other tests may have evaluated the session's bundle since: its card then holds their results too)
    assert "Not evaluated on held-out data yet" in card_markdown(bundle_card(small_bundle))
    assert str(document["training"]["data"]) not in text  # the data set's name, not where it lay


def test_evaluate_rewrites_the_card_with_its_metrics(small_bundle, small_dataset, feature_cache, tmp_path) -> None:
    from retinalens.evaluate.run import evaluate_bundle

    bundle = load_bundle(shutil.copytree(small_bundle.path, tmp_path / "model"))  # the session's stays as trained
    evaluate_bundle(bundle, small_dataset, cache=feature_cache, json_path=tmp_path / "m.json", n_boot=200,
                    progress=False)
    saved = json.loads((tmp_path / "m.json").read_text())
    text = (bundle.path / CARD_FILE).read_text(encoding="utf-8")
    assert headings(text) == list(SECTIONS)
    evaluation = text[text.index("### Evaluation"):]
    assert f"| Accuracy | {fmt(saved['accuracy'], saved['accuracy_ci'])} |" in evaluation
    assert saved["accuracy_ci"] and f"{saved['accuracy_ci'][0]:.3f}–{saved['accuracy_ci'][1]:.3f}" in evaluation
    urgent = saved["urgent_referral"]
    assert f"{fmt(urgent['sensitivity'], urgent['sensitivity_ci'])} |" in evaluation
    assert f"- **Data set:** {small_dataset.name}\n- **Split:** test\n" in text
    assert f"- **Images / patients:** {saved['n_images']} / {saved['n_patients']}" in text
    assert "Not evaluated on held-out data yet" not in text
    assert served_card_markdown(bundle) == text  # the web app shows this very file


def test_an_unwritable_card_never_loses_the_evaluation(small_bundle, small_dataset, feature_cache, tmp_path,
                                                         capsys) -> None:
    from retinalens.evaluate.run import evaluate_bundle

    bundle = load_bundle(shutil.copytree(small_bundle.path, tmp_path / "model"))
    (bundle.path / CARD_FILE).unlink()
    (bundle.path / CARD_FILE).mkdir()  # cannot be replaced by a file, even by root
    m = evaluate_bundle(bundle, small_dataset, cache=feature_cache, json_path=tmp_path / "m.json", n_boot=0,
                        progress=False)
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == m["accuracy"]
    assert "the model card was not updated" in capsys.readouterr().err
    assert served_card_markdown(bundle) == card_markdown(bundle_card(bundle))  # the manifest's card instead


def test_a_card_of_other_weights_is_not_served(small_bundle, tmp_path) -> None:
    bundle = load_bundle(shutil.copytree(small_bundle.path, tmp_path / "model"))
    stale = (bundle.path / CARD_FILE).read_text().replace(bundle.manifest_sha256, "0" * 64) + "\nstale words\n"
    (bundle.path / CARD_FILE).write_text(stale)
    served = served_card_markdown(bundle)
    assert "stale words" not in served and bundle.manifest_sha256 in served


def test_every_value_is_escaped() -> None:
    document = {"classes": ["<script>alert(1)</script>", "*bold*", "a|b"], "task": "_x_ [link](javascript:1)",
                "referral": {"*bold*": "urgent"}, "training": {"data": "/data/R&amp;D <set>"},
                "backbone": {"name": "efficientnet_lite0"}}
    text = card_markdown(model_card(document) | {"name": "<img src=x onerror=alert(1)>"})
    page = card_html(text, heading_offset=1)
    assert "<script" not in page and "<img" not in page and "<em>bold" not in page and "<a " not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "*bold*" in page and "a|b" in page
    assert "&amp;amp;" in page and "efficientnet_lite0" in page  # the text exactly as the manifest says
    assert page.startswith("<h2>Model card: &lt;img") and "<h3>Model details</h3>" in page
    assert headings(text) == list(SECTIONS)  # a hand-made manifest still gets every section


def test_referral_labels_come_from_the_referral_levels() -> None:
    assert referral_label(["CNV", "DME"], OCT_REFERRAL) == "Urgent referral"
    grade = TASKS["grade"]  # grade 2 is routine, 3 and 4 urgent: the decision on 2+3+4 is not "urgent"
    assert referral_label(grade.positive_classes, grade.referral) == "Referral (urgent or routine)"
    referable = TASKS["referable"]
    assert referral_label(referable.positive_classes, referable.referral) == "Routine referral"
    assert referral_label(["CNV"], None) == "Referral"
