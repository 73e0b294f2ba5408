"""The conformance runner: one row per case, compiled in its own process with a timeout, a memory limit and its
peak memory; a case that fails is a row with a one-line error, never a traceback; fidelity is judged by
output kind against the fp32 torch module. (These tests check the runner; the table reports the truth.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitpass.backends.measure import LARGE_BATCHES
from bitpass.tools import conformance as cf


@pytest.fixture(scope="module")
def detector_rows(tmp_path_factory) -> list[cf.Row]:
    """A real run: the fast detector exported by torch and compiled from the module, fp32 and int8; its three
    cases on two worker processes (``--executor local:2``), as the table is made on a machine's cores."""
    from bitpass.passes.executors import ProcessExecutor

    work = tmp_path_factory.mktemp("conformance")
    with ProcessExecutor(2) as executor:
        return cf.run(["detector"], ["torchscript-17", "module"], ["optimize", "default"], size="fast", work=work,
                      timeout_s=240, executor=executor)


def test_plan_runs_every_pipeline_on_the_first_export_and_default_on_the_others():
    triples = cf.plan(["a"], ["e1", "e2"], ["optimize", "default", "mixed"])
    assert triples == [("a", "e1", "optimize"), ("a", "e1", "default"), ("a", "e1", "mixed"), ("a", "e2", "default")]
    assert len(cf.plan(["a", "b"], ["e1", "e2"], ["optimize", "mixed"], cross=True)) == 8
    assert cf.plan(["a"], ["e1", "e2"], ["mixed", "joint"])[-1] == ("a", "e2", "mixed")


def test_the_runner_gives_a_row_per_case_with_its_measurements(detector_rows):
    assert [(r.export, r.pipeline) for r in detector_rows] == [
        ("torchscript-17", "optimize"), ("torchscript-17", "default"), ("module", "default")]
    optimized = detector_rows[0]
    assert optimized.status == "ok", optimized.error
    assert optimized.output_kind == "features" and optimized.fidelity["samples"] > 0
    assert optimized.fidelity["cos_min"] > 0.9999, "fp32 folding and fusion keep the outputs"
    assert optimized.gate == "pass"
    assert optimized.bitpass_gate == f"cosine 1 on {optimized.fidelity['samples']}"  # the runner's data, its bound
    module = detector_rows[2]
    assert module.status == "ok" and module.bitpass_gate.startswith("cosine ")
    assert optimized.weight_ratio == pytest.approx(1.0, abs=0.01)
    larger = set(optimized.latency) - {"batch_1"}  # and the larger batch the summary chose (64 when quick)
    assert "batch_1" in optimized.latency and len(larger) == 1
    assert larger <= {f"batch_{b}" for b in LARGE_BATCHES}
    assert optimized.compile_s > 0 and optimized.peak_mb > 50
    assert [name.split("(")[0] for name, _ in optimized.passes] == ["fold-constants", "eliminate-dead-nodes", "fuse",
                                                                    "fuse-transformer"]
    for row in detector_rows:
        assert row.status in ("ok", "error", "crash", "timeout", "memory")
        assert "\n" not in row.error and "Traceback" not in row.error
        if row.status == "ok":
            assert row.fidelity and row.weight_ratio is not None and row.gate


def test_json_and_markdown_hold_every_row(detector_rows, tmp_path):
    info = cf.machine()
    assert info["cpu"] and info["cores"] >= 1 and "onnxruntime" in info["versions"]
    out = tmp_path / "rows.json"
    cf.write_json(out, detector_rows, info, {"size": "fast"})
    assert [r.pipeline for r in cf.rows_from_json(out)] == [r.pipeline for r in detector_rows]
    assert json.loads(out.read_text())["machine"]["cpu"] == info["cpu"]
    table = cf.markdown(detector_rows, info)
    assert table.startswith("CPU: ")
    rows = [line for line in table.splitlines() if line.startswith("| detector")]
    assert len(rows) == len(detector_rows) and all(line.count(" | ") == len(cf.COLUMNS) - 1 for line in rows)


def _prepared(tmp_path: Path, model_bytes: bytes) -> Path:
    """A prepared family folder holding ``model_bytes`` as its only export (and real digits-sized data)."""
    folder = tmp_path / "family"
    (folder / "torchscript-17").mkdir(parents=True)
    (folder / "torchscript-17" / "model.onnx").write_bytes(model_bytes)
    x = np.zeros((4, 3, 8, 8), np.float32)
    np.savez(folder / "calib.npz", input=x)
    np.savez(folder / "eval.npz", input=x)
    np.save(folder / "reference.npy", np.zeros((4, 10), np.float32))
    info = {"family": "broken", "size": "fast", "output_kind": "logits", "trained": False, "input_names": ["input"],
            "exports": {"torchscript-17": {"status": "ok", "path": str(folder / "torchscript-17" / "model.onnx")}}}
    (folder / cf.PREPARED).write_text(json.dumps(info))
    return folder


def _case(folder: Path, **options) -> cf.Case:
    return cf.Case("broken", "fast", "torchscript-17", "default", str(folder), **options)


@pytest.fixture(scope="module")
def failing(tmp_path_factory) -> tuple[Path, cf.Row]:
    """(family folder, row) of a compile that fails in its child process (the model file is not ONNX), run once
    serially; the folder also lists a second export whose export failed (``dynamo-23``)."""
    folder = _prepared(tmp_path_factory.mktemp("failing"), b"\x08\x07 not an onnx model")
    info = json.loads((folder / cf.PREPARED).read_text())
    info["exports"]["dynamo-23"] = {"status": "export", "error": "export failed: ValueError: no"}
    (folder / cf.PREPARED).write_text(json.dumps(info))
    return folder, cf.run_case(_case(folder, timeout_s=120))


def test_a_failing_compile_is_a_row_with_the_one_line_error(failing):
    folder, row = failing
    assert row.status == "error"
    assert row.error and "\n" not in row.error and "Traceback" not in row.error
    assert row.peak_mb > 0 and row.compile_s is not None
    assert not any(p.name.startswith("case-") for p in folder.iterdir()), "scratch removed"


def test_a_case_past_its_timeout_is_killed_and_says_what_it_was_doing(tmp_path):
    row = cf.run_case(_case(_prepared(tmp_path, b""), timeout_s=0.5))
    assert row.status == "timeout"
    assert row.error.startswith("no result after")
    assert row.where.startswith(("before the first progress message", "during: "))


def test_a_case_above_the_memory_limit_is_killed(tmp_path):
    row = cf.run_case(_case(_prepared(tmp_path, b""), memory_limit_mb=20, timeout_s=120))
    assert row.status == "memory"
    assert "memory limit" in row.error and row.peak_mb >= 20


def test_an_export_that_failed_is_a_row_without_a_compile(tmp_path):
    folder = _prepared(tmp_path, b"")
    info = json.loads((folder / cf.PREPARED).read_text())
    info["exports"]["torchscript-17"] = {"status": "export", "error": "export failed: ValueError: no"}
    (folder / cf.PREPARED).write_text(json.dumps(info))
    row = cf.run_case(_case(folder))
    assert (row.status, row.error, row.compile_s) == ("export", "export failed: ValueError: no", None)


def test_isolated_processes_report_peak_memory_and_deaths(tmp_path):
    grow = "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"
    done = cf.run_isolated([sys.executable, "-c", grow], timeout_s=60, memory_limit_mb=4096, log=tmp_path / "a.log")
    assert done.returncode == 0 and not done.stopped and done.peak_mb >= 300
    die = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    dead = cf.run_isolated([sys.executable, "-c", die], timeout_s=60, memory_limit_mb=4096, log=tmp_path / "b.log")
    assert dead.returncode == -11
    status, error, _ = cf.stopped_reason(dead, tmp_path)
    assert status == "crash" and "SIGSEGV" in error


def test_fidelity_is_judged_by_output_kind():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 10))
    labels = logits.argmax(1)
    worse = logits.copy()
    worse[:5] = -worse[:5]
    f = cf.fidelity("logits", logits, worse, {"labels": labels})
    assert f["accuracy_fp32"] == 1.0 and f["accuracy_drop_points"] == pytest.approx(10.0)
    assert f["top1_agreement"] == pytest.approx(0.9)
    assert cf.gate("logits", f).startswith("miss")

    embeddings = rng.standard_normal((20, 8))
    e = cf.fidelity("embedding", embeddings, embeddings * 3.0, {})
    assert e["cos_min"] == pytest.approx(1.0) and cf.gate("embedding", e) == "pass"

    hidden = rng.standard_normal((4, 6, 8))
    mask = np.ones((4, 6), np.int64)
    mask[:, 4:] = 0
    noisy = hidden.copy()
    noisy[:, 4:] = rng.standard_normal((4, 2, 8))  # padded positions carry no meaning
    h = cf.fidelity("features", hidden, noisy, {"attention_mask": mask})
    assert h["cos_min"] == pytest.approx(1.0) and h["samples"] == 4

    lm = rng.standard_normal((2, 5, 30))
    shifted = lm.copy()
    shifted[0, 0] = -shifted[0, 0]
    t = cf.fidelity("lm-logits", lm, shifted, {"attention_mask": np.ones((2, 5), np.int64)})
    assert t["top1_agreement"] == pytest.approx(0.9) and t["tokens"] == 10 and t["kl"] > 0.1
    assert cf.gate("lm-logits", t).startswith("miss: KL")
    with pytest.raises(ValueError, match="shape"):
        cf.fidelity("features", hidden, hidden[:, :3], {})


def test_the_runner_judges_as_bitpass_gate_does():
    """Its bounds are bitpass's default tolerances, measured as bitpass's gate measures them, so an artifact that
    passes bitpass's gate on the runner's data passes the runner: tied fp32 maxima agree, a language model is
    judged by per-token KL, hidden states per real token."""
    from bitpass.tools import quality

    assert cf.GATE == {"accuracy_drop_points": quality.DEFAULTS["accuracy-drop"],
                       "top1_agreement": quality.DEFAULTS["agreement"], "min_cosine": quality.DEFAULTS["cosine"],
                       "kl": quality.DEFAULTS["kl"]}
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((100, 10))
    top = logits.argmax(1)
    tied = logits.copy()
    second = np.argsort(logits[:3], axis=1)[:, -2]
    tied[np.arange(3), second] = logits[np.arange(3), top[:3]] - 1e-6  # three near ties, flipped
    flipped = tied.copy()
    flipped[np.arange(3), second] += 2e-6
    f = cf.fidelity("logits", tied, flipped, {})
    assert f["top1_agreement"] == pytest.approx(0.97) and f["top1_agreement_ties"] == 1.0
    assert cf.gate("logits", f) == "pass" and "(100.0 % with ties)" in cf.describe_fidelity(cf.Row(
        "f", "fast", "e", "p", "ok", fidelity=f))
    real = logits.copy()
    real[:2] = -real[:2]  # two real disagreements in 100: 98 %
    assert cf.gate("logits", cf.fidelity("logits", logits, real, {})) == "miss: top-1 98.0 %"

    flat = rng.standard_normal((4, 8, 50)) * 1e-3  # a random-init language model: near-uniform next tokens
    noisy = flat + rng.standard_normal(flat.shape) * 1e-3
    lm = cf.fidelity("lm-logits", flat, noisy, {"attention_mask": np.ones((4, 8), np.int64)})
    assert lm["top1_agreement"] < 0.9 and lm["kl"] < 1e-4 and cf.gate("lm-logits", lm) == "pass"


def test_a_module_is_given_the_runners_bound_as_its_tolerance():
    """A module's outputs are named after torch's ops (``linear``): bitpass cannot tell logits from an embedding."""
    assert cf.tolerance_for("logits", labelled=False) == "agreement=0.99"
    assert cf.tolerance_for("logits", labelled=True) == "accuracy-drop=1"
    assert cf.tolerance_for("lm-logits", labelled=False) == "kl=0.03"
    assert cf.tolerance_for("features", labelled=False) == "cosine=0.99"
    assert cf.tolerance_for("embedding", labelled=False) == "cosine=0.99"


def test_bitpass_gate_is_described_from_its_record():
    assert cf.describe_gate({}) == ""
    assert cf.describe_gate({"passed": None, "skipped": "no data"}) == "not run: no data"
    record = {"passed": True, "tolerance": {"metric": "agreement", "threshold": 0.99}, "final": 0.9921875,
              "samples": 128, "fp32_layers": ["a", "b"]}
    assert cf.describe_gate(record) == "agreement 0.9922 on 128, 2 fp32"
    record.update(passed=False, warning="quality gate measured on 12 samples: ...", fp32_layers=[])
    assert cf.describe_gate(record) == "agreement 0.9922 on 128, missed, too few samples"


def test_one_line_names_the_innermost_cause():
    try:
        try:
            raise ValueError("Cannot view a tensor\nwith details")
        except ValueError as inner:
            raise RuntimeError("Failed to decompose the graph") from inner
    except RuntimeError as err:
        line = cf.one_line(err)
    assert line.startswith("ValueError: Cannot view a tensor") and "\n" not in line
    assert "Failed to decompose" in line


def test_command_line_lists_and_refuses_unknown_names(capsys):
    listing = subprocess.run([sys.executable, "-m", "bitpass.tools.conformance", "--list"], capture_output=True,
                             text=True, check=True).stdout
    assert "family   resnet18" in listing and "pipeline tvm" in listing and "export   module" in listing
    # the refusal is main()'s return value and stderr line: checked in this process (a second child's imports
    # cost seconds; the entry point itself is the one just run)
    assert cf.main(["--fast", "--families", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("conformance: error: unknown family nope")


def test_cases_run_in_worker_processes_give_the_serial_rows(failing):
    from bitpass.passes.executors import SERIAL, ProcessExecutor

    folder, serial_row = failing  # the failing compile's serial row: run once for this module
    cases = [_case(folder, timeout_s=120), cf.Case("broken", "fast", "dynamo-23", "default", str(folder))]
    finished = []
    with ProcessExecutor(2) as executor:
        parallel = executor.map(cf._run_one, cf.run_case, cases, on_result=lambda i, _: finished.append(i))
    serial = [serial_row, *SERIAL.map(cf._run_one, cf.run_case, cases[1:])]
    assert sorted(finished) == [0, 1]
    assert [(r.export, r.status, r.error) for r in parallel] == [(r.export, r.status, r.error) for r in serial]
    assert [r.status for r in parallel] == ["error", "export"]
