"""Patient ids from file names: the unit that splits and confidence intervals are grouped by."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RetinaLensError

# Kermany OCT2017: CNV-1016042-1.jpeg; Kaggle 2015 DR: 10_left.jpeg / 10_right.jpeg.
DEFAULT_PATTERNS = (
    r"^[A-Za-z]+-(?P<patient>\d+)-\d+$",
    r"^(?P<patient>\d+)_(?:left|right)$",
)


@dataclass(frozen=True)
class PatientParser:
    """Maps an image path to a patient id; images that match no pattern are their own patient."""

    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for p in self.patterns:
            try:
                rx = re.compile(p)
            except re.error as exc:
                raise RetinaLensError(f"patient regex {p!r} is not a valid regular expression: {exc}") from None
            if rx.groups == 0:
                raise RetinaLensError(f"patient regex {p!r} needs a group, e.g. (?P<patient>\\d+)")
            compiled.append(rx)
        object.__setattr__(self, "_compiled", tuple(compiled))

    @classmethod
    def from_regex(cls, regex: str | None) -> "PatientParser":
        return cls((regex,)) if regex else cls()

    def __call__(self, path: Path, fallback: str) -> str:
        """Patient id for `path` (matched on the file stem); `fallback` when nothing matches."""
        for rx in self._compiled:
            m = rx.search(path.stem)
            if m:
                return m.group("patient") if "patient" in rx.groupindex else m.group(1)
        return fallback
