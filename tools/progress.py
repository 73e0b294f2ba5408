"""How the command line shows progress: rich progress bars with a count and ETA on a terminal, a plain line
now and then otherwise (logs, CI), nothing with ``--quiet``. Passes report through ``passes/progress.py``."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bitpass.passes.progress import MessageReporter, Reporter, Task


def print_message(message: str) -> None:
    print(f"[bitpass] {message}", file=sys.stderr, flush=True)


class _BarTask:
    def __init__(self, owner: BarReporter, description: str, total: int, unit: str) -> None:
        self.owner, self.description, self.total, self.unit = owner, description, total, unit
        self.id: int | None = None

    def __enter__(self) -> _BarTask:
        bars = self.owner.bars()
        self.id = bars.add_task(self.description, total=max(self.total, 1), unit=f" {self.unit}s")
        return self

    def advance(self, steps: int = 1) -> None:
        if self.id is not None and self.owner.live is not None:
            self.owner.live.advance(self.id, steps)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.id is not None and self.owner.live is not None:
            self.owner.live.remove_task(self.id)
        self.owner.release()


class BarReporter:
    """Messages as lines, loops as progress bars (several may be open at once: a pass inside a repair loop)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.live: Progress | None = None
        self.open = 0

    def __call__(self, message: str) -> None:
        self.console.print(f"[dim]\\[bitpass][/dim] {message}", markup=True, highlight=False)

    def bars(self) -> Progress:
        if self.live is None:
            self.live = Progress(TextColumn("[bitpass] {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.console, transient=True)
            self.live.start()
        self.open += 1
        return self.live

    def release(self) -> None:
        self.open -= 1
        if self.open <= 0 and self.live is not None:
            self.live.stop()
            self.live, self.open = None, 0

    def task(self, description: str, total: int, unit: str = "step") -> Task:
        return _BarTask(self, description, total, unit)


def console_reporter(enabled: bool | None = None) -> Reporter:
    """The reporter the command line uses: bars on a terminal, plain lines elsewhere; ``enabled=False``: none."""
    from bitpass.passes.progress import SILENT

    if enabled is False:
        return SILENT
    if sys.stderr.isatty():
        return BarReporter()
    return MessageReporter(print_message)
