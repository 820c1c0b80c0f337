"""Terminal output shared by the commands: one progress bar, one console (stderr), safe file names."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

# C0 and C1 control characters and DEL: in a file name they would move the cursor, recolour or clear
# the terminal, or break a table row. Rich's markup escaping does not touch them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def console(stdout: bool = False) -> Console:
    """Messages and progress go to stderr, so stdout carries only results."""
    return Console(stderr=not stdout, emoji=False)  # `:name:` in a file name stays as it is


def printable(text: object) -> str:
    """`text` with every control character shown as its escape (`\\x1b`, `\\n`): for a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def markup_safe(text: object) -> str:
    """`text` to embed in a rich markup string: control characters shown, brackets kept as they are."""
    return escape(printable(text))


class _Rate(ProgressColumn):
    """Units per second, or seconds per unit when one takes longer than a second (an epoch on images)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        # rich's own speed looks at the last 30 s only: none while a unit takes longer. The mean since
        # the start (not counting units already done when it began: a resumed run) covers that.
        done = task.completed - task.fields.get("initial", 0)
        speed = task.speed or (done / task.elapsed if done > 0 and task.elapsed else None)
        if speed is None:
            text = f"{'-':>6} {self.unit}/s"
        elif speed >= 1:
            text = f"{speed:6.1f} {self.unit}/s"
        else:
            text = f"{1 / speed:6.1f} s/{self.unit}"
        return Text(text, style="progress.data.speed")


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "img",
                 completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yields advance(n): a bar with its rate (images/s by default) on stderr, or a no-op when disabled.
    `completed`: units already done before this run (a resumed one), left out of the rate."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=console(), transient=False) as bar:
        task = bar.add_task(description, total=total, completed=completed, initial=completed)
        yield lambda n=1: bar.advance(task, n)
