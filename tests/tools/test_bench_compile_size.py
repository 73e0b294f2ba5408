"""The compile-size benchmark end to end on a tiny GPT-2: a real export with external data, a real
``bitpass compile --pipeline optimize`` in a child process, the kernel's accounting and the stamped phases."""

from __future__ import annotations

import json

import pytest

from bitpass.tools import bench_compile_size


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "report.json"
    assert bench_compile_size.main(["--models", "gpt2-tiny", "--pipelines", "optimize", "--workdir", str(folder),
                                    "--quiet", "--calib-windows", "12", "--calib-length", "16", "--eval-windows", "8",
                                    "--eval-length", "16", "--json", str(out)]) == 0
    return folder, json.loads(out.read_text())


def test_the_model_is_exported_as_a_user_gets_it_with_external_data(report):
    folder, _ = report
    exported = folder / "gpt2-tiny-external"
    assert (exported / "model.onnx").is_file() and (exported / "model.onnx.data").stat().st_size > 100_000
    assert {p.name for p in exported.iterdir()} >= {"calib.npz", "eval.npz", "export.json"}


def test_a_row_has_the_kernels_accounting_the_phases_and_the_manifests_per_pass_records(report):
    _, data = report
    (row,) = data["rows"]
    done = row["compile"]
    assert done["returncode"] == 0 and not done["stopped"]
    assert 0 < done["cpu_s"] and 0 < done["wall_s"] and 100 < done["peak_rss_mb"] < 8000
    messages = [phase["message"] for phase in done["phases"]]
    assert "importing model" in messages and any(m.startswith("emitting") for m in messages)
    assert sum(phase["seconds"] for phase in done["phases"]) == pytest.approx(done["wall_s"], abs=0.5)
    passes = [entry["pass"] for entry in row["manifest"]["resources"]["passes"]]
    assert passes[0] == "fold-constants" and passes[-1].startswith("fuse-transformer")
    resources = row["manifest"]["resources"]
    assert 0 < resources["peak_rss_mb"] <= resources["compile_peak_rss_mb"] <= done["peak_rss_mb"] + 1
    after = resources["peak_rss_mb_after"]  # the high-water mark at the end of each phase: it only rises
    phases = [after[k] for k in ("passes", "fp32_reference", "emit_and_quality_gate", "measure")]
    assert 0 < phases[0] and phases == sorted(phases) and phases[-1] <= resources["compile_peak_rss_mb"]
    assert row["manifest"]["quality_gate"]["passed"] is True
    assert data["cpu"]["cores"] >= 1
