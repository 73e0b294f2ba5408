"""The command line's progress: bars with count and ETA on a terminal, plain lines elsewhere, none with -q."""

from __future__ import annotations

import io

from rich.console import Console

from bitpass.passes.progress import MessageReporter
from bitpass.tools.cli import main
from bitpass.tools.progress import BarReporter, console_reporter


def test_a_terminal_gets_a_bar_with_count_and_eta():
    out = io.StringIO()
    reporter = BarReporter(Console(file=out, force_terminal=True, width=120, color_system=None))
    reporter("calibrating")
    with reporter.task("sensitivity", total=4, unit="layer") as task:
        task.advance(2)
        reporter.live.refresh()
        drawn = out.getvalue()
    assert "calibrating" in drawn and "sensitivity" in drawn and "2/4" in drawn and "ETA" in drawn
    assert reporter.live is None  # closed with the last task


def test_not_a_terminal_gets_plain_lines(capsys):
    reporter = console_reporter(True)  # pytest's stderr is not a terminal
    assert isinstance(reporter, MessageReporter)
    reporter("step one")
    assert capsys.readouterr().err == "[bitpass] step one\n"


def test_quiet_prints_nothing_but_the_result(digits_files, tmp_path, capsys):
    assert main(["compile", str(digits_files / "model.onnx"), "-o", str(tmp_path / "o"), "--pipeline", "optimize",
                 "--no-latency", "-q"]) == 0
    assert capsys.readouterr().err == ""
