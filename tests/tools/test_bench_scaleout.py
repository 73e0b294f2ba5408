"""The scale-out benchmark runs end to end on a tiny GPT-2 and checks that every executor gave the serial result
(the sensitivity table, or the written model); the speed-up itself is measured by running the tool, not asserted."""

from __future__ import annotations

import pytest

from bitpass.tools import bench_scaleout


@pytest.mark.parametrize("step", ["sensitivity", "quantize-weights"])
def test_serial_and_worker_processes_give_the_same_result(capsys, monkeypatch, step, tiny_gpt2_64):
    # ``--size tiny`` is ``tiny_gpt2(width=64)``: the session's export of that same decoder (a copy per run) spares
    # the tool a torch.export per step; what is checked is the executors' agreement, not the export
    model, spec = tiny_gpt2_64
    monkeypatch.setattr(bench_scaleout, "_model", lambda size, quick: (model.clone(), spec, f"gpt2-{size}"))
    code = bench_scaleout.main(["--size", "tiny", "--step", step, "--executors", "serial,local:2", "--windows", "8",
                                "--length", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("CPU: ")
    assert ("sensitivity(method=output-kl)" in out) == (step == "sensitivity")
    rows = [line for line in out.splitlines() if line.startswith("| serial") or line.startswith("| local:2")]
    assert len(rows) == 2 and all("| yes |" in row for row in rows)
