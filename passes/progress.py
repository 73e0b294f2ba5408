"""Progress of long work: one-off messages and counted tasks with an ETA.

A pass reports through ``ctx.progress``: ``ctx.progress("calibrating")`` for a message, and

    with ctx.progress.task("sensitivity", total=len(layers), unit="layer") as task:
        for layer in layers:
            ...
            task.advance()

for a loop. How it is shown is the caller's business: the command line draws rich progress bars with a count
and ETA on a terminal, prints a plain line now and then when stderr is not a terminal, and nothing with
``--quiet``. A plain ``Callable[[str], None]`` (what tests and plugins pass) is wrapped by ``as_reporter``:
tasks then become messages at their start, every ``interval`` seconds, and at their end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, runtime_checkable


class Task(Protocol):
    def advance(self, steps: int = 1) -> None: ...

    def __enter__(self) -> Task: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None: ...


@runtime_checkable
class Reporter(Protocol):
    """What ``ctx.progress`` is: callable with a message, and ``task(description, total)`` for loops."""

    def __call__(self, message: str) -> None: ...

    def task(self, description: str, total: int, unit: str = "step") -> Task: ...


def eta_text(done: int, total: int, elapsed: float) -> str:
    """``"3/10 layers, 12 s, about 28 s left"``-style remainder of a line."""
    if done <= 0 or done >= total:
        return f"{done}/{total}, {elapsed:.0f} s"
    left = elapsed / done * (total - done)
    return f"{done}/{total}, {elapsed:.0f} s, about {left:.0f} s left"


class _MessageTask:
    """A task told as messages: at the start, at most every ``interval`` seconds, and at the end."""

    def __init__(self, say: Callable[[str], None], description: str, total: int, unit: str,
                 interval: float) -> None:
        self.say, self.description, self.total, self.unit, self.interval = say, description, total, unit, interval
        self.done = 0
        self.start = self.last = time.monotonic()

    def __enter__(self) -> _MessageTask:
        self.say(f"{self.description}: {self.total} {self.unit}{'s' if self.total != 1 else ''}")
        return self

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        now = time.monotonic()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self.say(f"{self.description}: {eta_text(self.done, self.total, now - self.start)}")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None and self.total > 1:
            self.say(f"{self.description}: done in {time.monotonic() - self.start:.1f} s")


class MessageReporter:
    """A ``Reporter`` over a plain message callback."""

    def __init__(self, say: Callable[[str], None], interval: float = 5.0) -> None:
        self.say, self.interval = say, interval

    def __call__(self, message: str) -> None:
        self.say(message)

    def task(self, description: str, total: int, unit: str = "step") -> Task:
        return _MessageTask(self.say, description, total, unit, self.interval)


class _Silent:
    def __call__(self, message: str) -> None:
        pass

    def task(self, description: str, total: int, unit: str = "step") -> Task:
        return _MessageTask(self, description, total, unit, float("inf"))


SILENT: Reporter = _Silent()


def as_reporter(progress: Callable[[str], None] | Reporter | None) -> Reporter:
    """``progress`` as a ``Reporter`` (None reports nothing)."""
    if progress is None:
        return SILENT
    if isinstance(progress, Reporter):
        return progress
    return MessageReporter(progress)
