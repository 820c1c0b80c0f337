"""`retinalens predict BUNDLE INPUT... --engine ray --out FILE` with no --json, --csv or --sr-out: the
results stream into the Parquet file (api.predict_parquet) and are never all held, so the command
prints what it can say as they pass: each failed input at once, then the counts (rows written, the
gate's verdicts). The rows themselves are in the file, not on the terminal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._console import console, markup_safe
from ..errors import RetinaLensError
from .output import print_gate_counts


@dataclass
class Tally:
    """What the command reports about a stream of prediction results, counted as they pass."""

    n: int = 0
    failed: int = 0
    checked: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # why the gate found inputs ungradable

    def add(self, result: dict[str, Any]) -> None:
        self.n += 1
        if "error" in result:
            self.failed += 1
            console().print(f"[red]failed[/] {markup_safe(result['error'])}", highlight=False, soft_wrap=True)
        if (gate := result.get("gate")) is not None:
            self.checked += 1
            if not gate["ok"]:
                self.reasons[gate["reason"]] = self.reasons.get(gate["reason"], 0) + 1


def predict_streamed(model: Any, inputs: list[str], out: Path, *, gated: bool, **options: Any) -> None:
    """Stream `inputs`' predictions into `out` (options: api.predict_parquet's) and report them."""
    from ..api import predict_parquet
    from ..trust.gate import summary_of

    tally = Tally()
    written = predict_parquet(model, inputs, out, on_result=tally.add, **options)
    console().print(f"{written} prediction(s) ({tally.failed} failed): {markup_safe(out)}", highlight=False,
                    soft_wrap=True)
    print_gate_counts(summary_of(tally.checked, tally.reasons) if tally.checked else None, gated)
    if tally.failed and tally.failed == tally.n:
        raise RetinaLensError(f"none of the {tally.n} input(s) could be read")
