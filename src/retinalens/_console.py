"""Terminal output shared by the commands: one progress bar, one console (stderr)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


def console(stdout: bool = False) -> Console:
    """Messages and progress go to stderr, so stdout carries only results."""
    return Console(stderr=not stdout)


class _ImagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0.0:6.1f} img/s", style="progress.data.speed")


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[callable]:
    """Yields advance(n): a bar with images/s on stderr, or a no-op when disabled."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _ImagesPerSecond(),
               TimeRemainingColumn())
    with Progress(*columns, console=console(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
