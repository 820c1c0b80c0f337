from pathlib import Path

import pytest

from retinalens.data.discover import Dataset, Sample
from retinalens.data.tasks import TASKS, apply_task, get_task
from retinalens.errors import RetinaLensError


def grades(*labels: str) -> Dataset:
    return Dataset(Path("."), "csv", [Sample(Path(f"{i}_left.jpeg"), lab, str(i)) for i, lab in enumerate(labels)], [])


def test_referable_is_grade_two_or_more():
    ds, dropped = apply_task(grades("0", "1", "2", "3", "4"), TASKS["referable"])
    assert [s.label for s in ds.samples] == ["non-referable", "non-referable", "referable", "referable", "referable"]
    assert ds.classes == ["non-referable", "referable"] and not dropped


def test_grade_task_keeps_all_five_classes_even_if_absent():
    ds, _ = apply_task(grades("0", "2"), TASKS["grade"])
    assert ds.classes == ["0", "1", "2", "3", "4"] and [s.label for s in ds.samples] == ["0", "2"]


def test_grades_outside_zero_four_are_dropped_with_a_reason_and_the_rest_goes_on():
    ds, dropped = apply_task(grades("0", "5", "x", "", "-1", "3"), TASKS["grade"])
    assert [s.label for s in ds.samples] == ["0", "3"]
    assert len(dropped) == 4 and all("0-4" in d["reason"] for d in dropped)


def test_no_grades_at_all_and_unknown_tasks_are_errors():
    with pytest.raises(RetinaLensError, match="grade"):
        apply_task(grades("CNV", "DME"), TASKS["referable"])
    with pytest.raises(RetinaLensError, match="unknown task"):
        get_task("glaucoma")
    assert get_task(None) is None and apply_task(grades("CNV"), None)[0].samples[0].label == "CNV"


def test_referral_levels_follow_the_clinical_scale():
    g = TASKS["grade"]
    assert [g.referral[c] for c in g.classes] == ["observation", "observation", "routine", "urgent", "urgent"]
    assert g.positive_classes == ("2", "3", "4") and g.ordinal and not TASKS["referable"].ordinal
