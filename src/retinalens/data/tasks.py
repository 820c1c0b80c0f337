"""Tasks over diabetic-retinopathy grades: what a model predicts from the 0-4 grades a dataset brings.

- referable: grade >= 2 (moderate NPDR or worse) vs < 2, the screening decision;
- grade: the five grades themselves (ordinal: evaluated with quadratic weighted kappa).
Referral levels follow the International Clinical DR scale's advice: no or mild DR is re-screened
(observation), moderate NPDR is referred (routine), severe NPDR and PDR urgently.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import RetinaLensError
from .discover import Dataset

REFERABLE_FROM = 2


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    referral: dict[str, str]
    positive_classes: tuple[str, ...]  # the referral decision evaluated as sensitivity/specificity/AUC
    ordinal: bool

    def label(self, grade: int) -> str:
        if self.name == "referable":
            return "referable" if grade >= REFERABLE_FROM else "non-referable"
        return str(grade)


TASKS = {
    "referable": Task("referable", ("non-referable", "referable"),
                      {"non-referable": "observation", "referable": "routine"}, ("referable",), ordinal=False),
    "grade": Task("grade", ("0", "1", "2", "3", "4"),
                  {"0": "observation", "1": "observation", "2": "routine", "3": "urgent", "4": "urgent"},
                  ("2", "3", "4"), ordinal=True),
}


def get_task(name: str | None) -> Task | None:
    if name in (None, "oct", "classes"):  # the labels as they are (what a bundle records then)
        return None
    if name not in TASKS:
        raise RetinaLensError(f"unknown task '{name}': use {', '.join(TASKS)} (or none: the labels as they are)")
    return TASKS[name]


def apply_task(ds: Dataset, task: Task | None) -> tuple[Dataset, list[dict[str, Any]]]:
    """Relabel DR grades for `task`; rows whose label is not a grade 0-4 are dropped and returned."""
    if task is None:
        return ds, []
    kept, dropped = [], []
    for s in ds.samples:
        label = (s.label or "").strip()
        if label.isdigit() and 0 <= int(label) <= 4:
            kept.append(replace(s, label=task.label(int(label))))
        else:
            dropped.append({"path": str(s.path), "reason": f"grade {label!r} is not one of 0-4"})
    if not kept:
        raise RetinaLensError(f"{ds.root}: no image has a DR grade 0-4, so task '{task.name}' does not apply")
    return replace(ds, samples=kept, classes=list(task.classes)), dropped
