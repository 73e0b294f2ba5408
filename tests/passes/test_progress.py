"""Progress reporting: messages and counted tasks; a plain callback gets tasks as occasional lines with an ETA."""

from __future__ import annotations

import pytest

from bitpass.passes.infra import PassContext
from bitpass.passes.progress import SILENT, MessageReporter, Reporter, as_reporter, eta_text


def test_a_plain_callback_is_wrapped_and_tasks_become_lines():
    lines: list[str] = []
    ctx = PassContext(progress=lines.append)
    assert isinstance(ctx.progress, Reporter)
    ctx.progress("hello")
    with ctx.progress.task("sensitivity", total=3, unit="layer") as task:
        for _ in range(3):
            task.advance()
    assert lines[0] == "hello" and lines[1] == "sensitivity: 3 layers" and lines[-1].startswith("sensitivity: done in")


def test_intermediate_lines_come_at_most_every_interval(monkeypatch):
    import bitpass.passes.progress as progress

    clock = iter([0.0, 1.0, 2.0, 6.0, 7.0, 12.0, 13.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    with MessageReporter(lines.append, interval=5.0).task("probe", total=10) as task:
        for _ in range(5):
            task.advance()
    assert lines[0] == "probe: 10 steps"
    assert [line for line in lines if "left" in line] == ["probe: 3/10, 6 s, about 14 s left",
                                                          "probe: 5/10, 12 s, about 12 s left"]  # 1 s, 7 s: too soon


def test_eta_text():
    assert eta_text(0, 10, 1.0) == "0/10, 1 s"
    assert eta_text(5, 10, 10.0) == "5/10, 10 s, about 10 s left"


def test_none_is_silent_and_a_reporter_is_kept():
    assert as_reporter(None) is SILENT
    reporter = MessageReporter(print)
    assert as_reporter(reporter) is reporter
    with pytest.raises(ZeroDivisionError), SILENT.task("x", 2) as task:
        task.advance()
        raise ZeroDivisionError  # errors pass through tasks
