"""What every entry point must do with the corpus, as checks that collect every violation before failing.

A test gathers what happened to each item (its outcome), then `Violations` compares the outcomes with
what the items expect and fails once, listing per corpus class how many items broke which rule and one
example each: the message is the checklist of what is left to fix.
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from robustness.corpus import ESCAPE, Spec
from helpers import cli_command, cli_env

# What happened to an item: an error entry, a class label, decoded but refused a label (the quality
# gate), or nothing at all (not reported).
ERROR, LABELLED, REFUSED, MISSING = "error", "labelled", "refused", "missing"
RAW_ESCAPES = (ESCAPE, "\x1b]0;")  # sequences the corpus's file names carry; a terminal would obey them


def outcome_of(result: dict[str, Any] | None) -> str:
    """The outcome of one prediction result ({error} or {label, gate, ...}; None: not reported)."""
    if result is None:
        return MISSING
    if "error" in result:
        return ERROR
    return LABELLED if result.get("label") else REFUSED


# A bit-flipped JPEG that libjpeg decodes without a warning and whose pixels stay this close to its
# source's is the source scan to any reader: JPEG carries no checksum and its Huffman code resynchronises,
# so a flip that keeps the block count is a valid stream of a near-identical image (a shifted DC level
# from the flip on: a brightness offset of a few grey levels, far inside what the gate's fitted
# brightness check accepts of real scans; and a speck of a few garbled blocks). Measured on the corpus:
# the flips that decode cleanly stay within a mean 4.8 grey levels and 0.3% of pixels changed by more
# than 16. Only those, and only with their source's own label where that is known, may be labelled.
BENIGN_MEAN_DIFF, BENIGN_CHANGED, BENIGN_CHANGED_FRACTION = 8.0, 16, 0.005


def benign_damage(spec: Spec) -> bool:
    """Whether a damaged copy decodes (strictly, as the toolkit does) to its source's pixels but for the
    bounds above: the only damage that may pass unrefused."""
    if not spec.source_data:
        return False
    import numpy as np

    from retinalens.data.decode import decode_image
    from retinalens.errors import ImageDecodeError

    try:
        a = np.asarray(decode_image(spec.data, keep_grey=True), dtype=np.int16)
    except ImageDecodeError:
        return False
    b = np.asarray(decode_image(spec.source_data, keep_grey=True), dtype=np.int16)
    if a.shape != b.shape:
        return False
    diff = np.abs(a - b)
    return float(diff.mean()) <= BENIGN_MEAN_DIFF and float((diff > BENIGN_CHANGED).mean()) <= BENIGN_CHANGED_FRACTION


def broken_rule(spec: Spec, outcome: str, detail: str = "", source_label: str | None = None) -> str | None:
    """Why `outcome` breaks what `spec` expects, or None when it does not. `source_label`: what the
    clean item `spec` was made from was labelled, when known."""
    allowed = {"error": {ERROR}, "valid": {LABELLED}, "ungradable": {ERROR, REFUSED}}[spec.expect]
    if outcome in allowed:
        return None
    if outcome == LABELLED and benign_damage(spec):
        if source_label is None or source_label == detail:
            return None
        return f"a benignly damaged copy got another label than its source ({detail} vs {source_label})"
    what = {"error": "not an image", "valid": "a valid image", "ungradable": "an ungradable image"}[spec.expect]
    return f"{what} came back {outcome}" + (f" ({detail})" if detail else "")


class Violations:
    """Broken rules grouped by corpus class: (rule, item name) pairs, reported together."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.by_cls: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def add(self, cls: str, rule: str, name: str) -> None:
        self.by_cls[cls].append((rule, name))

    def check_outcomes(self, specs: Iterable[Spec], outcomes: dict[str, tuple[str, str]]) -> None:
        """outcomes: item name -> (outcome, detail such as the label or the error)."""
        for s in specs:
            outcome, detail = outcomes.get(s.name, (MISSING, ""))
            source, source_detail = outcomes.get(s.source, (MISSING, ""))
            if rule := broken_rule(s, outcome, detail, source_detail if source == LABELLED else None):
                self.add(s.cls, rule.split(" (")[0], f"{s.name!r}: {rule}")

    def check_process(self, proc: subprocess.CompletedProcess) -> None:
        """A command line run over inputs that include valid images: it finishes (exit code 0; 2 would
        mean it gave up with work left, 1 a crash), prints no traceback and no raw terminal escape."""
        if proc.returncode != 0:
            last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
            self.add("process", f"exit code {proc.returncode}", repr(last[:300]))
        if "Traceback" in proc.stderr:
            self.add("process", "traceback on stderr", _tail(proc.stderr))
        for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            for seq in RAW_ESCAPES:
                if seq in text:
                    line = next(ln for ln in text.splitlines() if seq in ln)
                    self.add("odd-name", f"raw terminal escape on {stream}", repr(line[:160]))

    def assert_none(self) -> None:
        if not self.by_cls:
            return
        lines = [f"{self.where}: {sum(map(len, self.by_cls.values()))} violation(s)"]
        for cls, found in sorted(self.by_cls.items()):
            rules: dict[str, list[str]] = defaultdict(list)
            for rule, example in found:
                rules[rule].append(example)
            for rule, examples in rules.items():
                lines.append(f"  [{cls}] {rule}: {len(examples)} item(s), e.g. {examples[0]}")
        raise AssertionError("\n".join(lines))


def _tail(text: str, n: int = 600) -> str:
    return repr(text[-n:])


def run_cli(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """`retinalens ARGS` in its own process; output decoded without failing on any byte a name holds.
    A run that outlives `timeout` (a reader stuck on a FIFO, say) fails the test saying so."""
    try:
        proc = subprocess.run(cli_command(*args), capture_output=True, env=cli_env(NO_COLOR="1"), timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"retinalens {args[0]} did not finish within {timeout:g} s (stuck on an input?)") from exc
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def by_input(results: list[dict[str, Any]], folder: Path, specs: Iterable[Spec]) -> dict[str, tuple[str, str]]:
    """Prediction results keyed by item name (a result's `input` is the path it was given)."""
    named = {str(folder / s.name): s.name for s in specs}
    out: dict[str, tuple[str, str]] = {}
    for r in results:
        name = named.get(r.get("input", ""))
        if name is not None:
            out[name] = (outcome_of(r), str(r.get("error") or r.get("label") or (r.get("gate") or {}).get("reason")))
    return out
