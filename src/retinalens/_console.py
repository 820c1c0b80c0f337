"""Terminal output shared by the commands: one progress bar, one console (stderr)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


def console(stdout: bool = False) -> Console:
    """Messages and progress go to stderr, so stdout carries only results."""
    return Console(stderr=not stdout)


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0.0:6.1f} {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "img") -> Iterator[Callable[..., None]]:
    """Yields advance(n): a bar with its rate (images/s by default) on stderr, or a no-op when disabled."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=console(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
