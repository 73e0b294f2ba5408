"""Mixed precision from the command line: --budget switches to the mixed pipeline and the artifact meets it."""

from __future__ import annotations

import re

import pytest

from bitpass.backends.artifact import read_manifest
from bitpass.tools.cli import main


@pytest.fixture(scope="module")
def mixed_artifact(tmp_path_factory, digits_files):
    out = tmp_path_factory.mktemp("mixed") / "artifact"
    code = main(["compile", str(digits_files / "model.onnx"), "--calib", str(digits_files / "calib.npz"),
                 "--eval", str(digits_files / "eval.npz"), "-o", str(out), "--budget", "avg-bits=4", "--sweep",
                 "-q"])
    assert code == 0
    return out


def test_avg_bits_4_keeps_accuracy_and_shrinks_weights_sixfold(mixed_artifact):
    manifest = read_manifest(mixed_artifact)
    assert manifest["pipeline_name"] == "mixed"
    assert manifest["summary"]["average_weight_bits"] <= 4.0 + 1e-9
    assert manifest["metrics"]["size"]["weight_ratio"] <= 0.16
    assert manifest["metrics"]["quality"]["accuracy"]["drop_points"] <= 0.5


def test_every_layer_records_its_bits_format_and_the_timings_that_justify_it(mixed_artifact):
    manifest = read_manifest(mixed_artifact)
    allocation = manifest["records"]["allocation"]
    if not allocation["latency_measured"]:  # measured slower end to end (timing noise): recompiled packed, said so
        assert any("used packed" in note for note in manifest["records"]["notes"])
        assert all(f["format"] in ("packed", "fp32") for f in allocation["formats"].values())
        return
    # the whole-graph format search may move a layer the allocation bought in fp32 to 8-bit int8 compute (the
    # merged plan: int8 wherever the int8 artifact computes int8) and says so
    changed = (manifest["records"]["quantization"].get("search") or {}).get("changed", {})
    for layer in manifest["layers"]:
        chosen = allocation["formats"][layer["id"]]
        if layer["id"] in changed and allocation["plan"][layer["id"]] == 32:
            assert layer["bits"]["weight"] == 8 and changed[layer["id"]] == "8-bit qdq"
            continue
        assert layer["bits"]["weight"] == allocation["plan"][layer["id"]]
        assert chosen["format"] in ("packed", "qdq", "dynamic", "matmulnbits", "blocked-dq", "fp32") and chosen["why"]
        ms, fp32_ms = chosen["ms"], chosen["fp32_ms"]
        assert set(fp32_ms) == {"1", "8"} and all(t > 0 for t in fp32_ms.values()), layer["id"]  # both batches
        if chosen["format"] in ("packed", "fp32"):
            assert ms == fp32_ms  # packed runs the fp32 kernel
        else:  # a compute format is taken only when it is at least 10 % faster at every batch size
            assert all(ms[b] <= 0.9 * fp32_ms[b] + 1e-4 for b in fp32_ms), (layer["id"], chosen)


def test_sweep_records_a_monotone_frontier_and_the_report_plots_it(mixed_artifact):
    manifest = read_manifest(mixed_artifact)
    frontier = manifest["records"]["allocation"]["frontier"]
    points = frontier["recorded"]
    assert len(points) >= 3
    costs = [p["cost"] for p in points]
    losses = [p["loss"] for p in points]
    assert costs == sorted(costs) and losses == sorted(losses, reverse=True)
    assert "data:image/png;base64," in (mixed_artifact / "report.html").read_text()


def test_verify_passes_on_the_mixed_artifact(mixed_artifact, digits_files):
    assert main(["verify", str(mixed_artifact), "--eval", str(digits_files / "eval.npz")]) == 0


def test_size_budget(digits_files, tmp_path):
    out = tmp_path / "sized"
    assert main(["compile", str(digits_files / "model.onnx"), "--calib", str(digits_files / "calib.npz"), "-o",
                 str(out), "--budget", "size=60KB", "--no-latency", "-q"]) == 0
    manifest = read_manifest(out)
    assert manifest["records"]["allocation"]["totals"]["size"] <= 60_000
    assert manifest["metrics"]["size"]["weight_bytes"] <= 60_000 * 1.1  # scales/shape constants are the slack


def test_accuracy_drop_budget_bisects_on_the_evaluation_data(digits_files, tmp_path):
    out = tmp_path / "drop"
    assert main(["compile", str(digits_files / "model.onnx"), "--calib", str(digits_files / "calib.npz"),
                 "--eval", str(digits_files / "eval.npz"), "-o", str(out), "--budget", "accuracy-drop=0.5",
                 "--no-latency", "-q"]) == 0
    manifest = read_manifest(out)
    assert manifest["metrics"]["quality"]["accuracy"]["drop_points"] <= 0.5 + 1e-9
    assert manifest["summary"]["average_weight_bits"] < 8
    assert any("not independent" in note for note in manifest["records"]["notes"])


def test_budget_on_a_pipeline_without_allocation_is_refused(digits_files, tmp_path, capsys):
    code = main(["compile", str(digits_files / "model.onnx"), "-o", str(tmp_path / "o"), "--pipeline", "optimize",
                 "--budget", "avg-bits=4"])
    assert code == 2 and "no allocate-bits pass" in capsys.readouterr().err


def test_infeasible_budget_says_the_smallest_possible(digits_files, tmp_path, capsys):
    code = main(["compile", str(digits_files / "model.onnx"), "--calib", str(digits_files / "calib.npz"), "-o",
                 str(tmp_path / "o"), "--budget", "avg-bits=1", "--no-latency", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "o").exists()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    smallest = re.search(r"the smallest achievable avg-bits is ([0-9.]+)", err)
    assert smallest, err
    assert 2.0 <= float(smallest.group(1)) < 2.5  # every layer at 2 bits, plus the fp32-only layers' share


def test_joint_pipeline_takes_the_size_budget_from_the_command_line(digits_files, tmp_path):
    out = tmp_path / "joint"
    assert main(["compile", str(digits_files / "model.onnx"), "--calib", str(digits_files / "calib.npz"),
                 "-o", str(out), "--pipeline", "joint", "--budget", "size=0.12x", "--no-latency", "-q"]) == 0
    manifest = read_manifest(out)
    assert 'allocate-joint(budget="size=0.12x")' in manifest["pipeline"]
    assert manifest["metrics"]["size"]["weight_ratio"] <= 0.12 + 1e-9
