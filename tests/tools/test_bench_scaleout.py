"""The scale-out benchmark runs end to end on a tiny GPT-2 and checks that every executor wrote the same model
(the speed-up itself is measured by running the tool, not asserted here)."""

from __future__ import annotations

from bitpass.tools import bench_scaleout


def test_serial_and_worker_processes_write_the_same_model(capsys):
    code = bench_scaleout.main(["--size", "tiny", "--executors", "serial,local:2", "--windows", "8",
                                "--length", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("CPU: ")
    rows = [line for line in out.splitlines() if line.startswith("| serial") or line.startswith("| local:2")]
    assert len(rows) == 2 and all("| yes |" in row for row in rows)
