"""Progress bars and status lines on stderr (rank 0 only), silenced by ``--quiet``.

stdout stays for results: the human summary, or the JSON object of ``--json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Draws progress when enabled; every method is a no-op otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = Console(stderr=True, soft_wrap=True)

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
        if not self.enabled or not self.console.is_terminal:  # logs get the epoch lines only
            yield Task(None, None)
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        with progress:
            yield Task(progress, progress.add_task(description, total=total, status=""))


class Task:
    def __init__(self, progress: Progress | None, task_id: int | None):
        self.progress = progress
        self.task_id = task_id

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        if self.progress is not None and self.task_id is not None:
            fields = {} if status is None else {"status": status}
            self.progress.update(self.task_id, advance=steps, **fields)
