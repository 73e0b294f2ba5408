"""The TVM backend end to end: compile the project's CNN and transformer, verify and run the artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")

from bitpass.backends.base import reference_runner  # noqa: E402
from bitpass.backends.tvm import TvmBackend, targets  # noqa: E402
from bitpass.frontend.errors import BitpassError  # noqa: E402
from bitpass.plugins import default_registry  # noqa: E402
from bitpass.tools import compile, run, verify  # noqa: E402

PIPELINE = "fold-constants,eliminate-dead-nodes,fuse"


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory, digits_files):
    out = tmp_path_factory.mktemp("tvm") / "cnn"
    return compile(str(digits_files / "model.onnx"), out, backend="tvm", pipeline="optimize",
                   evaluation=str(digits_files / "eval.npz"), latency=False)


def test_backend_is_registered_with_targets_and_capabilities():
    backend = default_registry().backend("tvm")()
    assert {"x86-64-avx2", "aarch64-neon"} <= set(backend.targets)
    caps = backend.capabilities(backend.default_target)
    assert caps.supports_op("", "Conv") and caps.supports_op("", "LayerNormalization")
    assert caps.widths_for("Gemm") == (4, 8, 32) and caps.widths_for("Conv") == (8, 32)


def test_fp32_artifact_matches_onnx_runtime(fp32_artifact, digits_files, digits_split):
    files = {p.name for p in fp32_artifact.path.iterdir()}
    assert {"model.so", "tvm.json", "tvm_run.py", "model.onnx", "manifest.json"} <= files
    assert "reference.onnx" not in files  # the fp32 reference never ships
    quality = fp32_artifact.metrics["quality"]
    assert quality["fidelity"]["top1_agreement"] == 1.0 and quality["fidelity"]["cosine"] > 0.99999
    config = json.loads((fp32_artifact.path / "tvm.json").read_text())
    assert config["functions"] == {"1": "main", "64": "main_b64"}
    # on AVX-512 the CNN's 3×3 stride-1 convs between blocked activations run Winograd's algorithm, their weights
    # stored transformed ((m+2)²/9 × their fp32 bytes) and counted so in the manifest
    winograd = {"conv2d_winograd"} if {"avx512", "vnni"} <= targets.host_features() else set()
    assert {layer["kernel"] for layer in config["layers"].values()} == {"conv2d", "dense"} | winograd
    from bitpass.frontend import from_onnx

    plan = from_onnx(fp32_artifact.path / "model.onnx")
    fp32 = {layer.id: layer.weight_array.nbytes for layer in plan.layers()}
    for layer, entry in config["layers"].items():
        if entry["kernel"] == "conv2d_winograd":
            m = int(entry["algorithm"].split("(")[1][0])
            assert entry["weight_bytes"] == fp32[layer] * (m + 2) ** 2 // 9
    # (the 10-class head stores zero columns up to a whole vector: its bytes differ too)
    extra = sum(entry["weight_bytes"] - fp32[layer] for layer, entry in config["layers"].items())
    assert fp32_artifact.metrics["size"]["weight_bytes"] == plan.weight_bytes() + extra
    # outputs equal ORT fp32's to rtol 1e-3, for batches compiled (1, 64) and not (7: batch-1 calls or padded)
    ort = reference_runner(from_onnx(digits_files / "model.onnx"))
    for size in (1, 7, 64):
        x = np.ascontiguousarray(digits_split.eval_x[:size])
        got = run(fp32_artifact.path, {"input": x})
        want = ort.run({"input": x})[0]
        np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-3, atol=1e-4)


def test_verify_passes_on_the_tvm_artifact(fp32_artifact, digits_files):
    checks = verify(fp32_artifact.path, str(digits_files / "eval.npz"))
    assert all(c.ok for c in checks), checks
    assert {c.name for c in checks} >= {"files", "plan", "fidelity"}


def test_annotated_int8_and_int4_layers_lower_to_integer_kernels(tmp_path, cnn_model, digits_files, digits_split):
    gemms = [layer.id for layer in cnn_model.layers() if layer.op_type in ("Gemm", "MatMul")]
    assert len(gemms) == 2
    pipeline = f"{PIPELINE},set-bits(layers={gemms[0]},weight=8),set-bits(layers={gemms[1]},weight=4)"
    artifact = compile(cnn_model, tmp_path / "mixed", backend="tvm", pipeline=pipeline,
                       evaluation=str(digits_files / "eval.npz"), latency=False)
    layers = json.loads((artifact.path / "tvm.json").read_text())["layers"]
    assert (layers[gemms[0]]["kernel"], layers[gemms[0]]["weight_bits"]) == ("dense_int8", 8)
    assert (layers[gemms[1]]["kernel"], layers[gemms[1]]["weight_bits"]) == ("dense_int4", 4)
    fidelity = artifact.metrics["quality"]["fidelity"]
    assert fidelity["top1_agreement"] >= 0.98 and fidelity["cosine"] > 0.995, fidelity
    # the manifest counts what the library stores: the two layers' kernel bytes, not their fp32 weights
    from bitpass.frontend import from_onnx

    plan = from_onnx(artifact.path / "model.onnx")  # the folded, fused, annotated graph the library came from
    fp32 = {layer.id: layer.weight_array.nbytes for layer in plan.layers()}
    # (a quantized plan keeps its fp32 convs direct: their stored bytes are their fp32 bytes)
    assert {entry["kernel"] for entry in layers.values()} == {"conv2d", "dense_int8", "dense_int4"}
    swapped = sum(layers[g]["weight_bytes"] - fp32[g] for g in gemms)
    assert artifact.metrics["size"]["weight_bytes"] == plan.weight_bytes() + swapped
    assert layers[gemms[1]]["weight_bytes"] < fp32[gemms[1]] / 6  # 4-bit codes + fp16 block scales


def test_a_batch_not_compiled_runs_padded_or_as_batch_1_calls_whichever_the_compile_time_timings_say_is_cheaper(
        fp32_artifact, digits_split):
    """The artifact has batches 1 and 64. Eight samples ran padded to 64 whatever the cost (ResNet-18 fp32: 8x the
    time of eight batch-1 calls); now ``tvm.json``'s host timings decide, and without timings (a cross-target
    artifact) padding wastes at most half the call. Same outputs either way."""
    model = TvmBackend().load(fp32_artifact.path, {}).model
    assert set(model.config["host_timing"]) >= {"batch_1_ms", "batch_64_ms"}  # measured when it was built
    calls = []
    model._calls = {b: (lambda b, f: lambda *a: calls.append(b) or f(*a))(b, f) for b, f in model._calls.items()}
    feed = {model.input_names[0]: np.ascontiguousarray(digits_split.eval_x[:8])}
    model.config["host_timing"] = {"batch_1_ms": 1.0, "batch_64_ms": 20.0}
    assert (model.padded_to(8), model.padded_to(20), model.padded_to(21)) == (None, None, 64)
    split = model.run(feed)[0]
    assert calls == [1] * 8
    model.config["host_timing"] = {"batch_1_ms": 1.0, "batch_64_ms": 5.0}
    calls.clear()
    padded = model.run(feed)[0]
    assert calls == [64]
    np.testing.assert_allclose(split, padded, rtol=1e-5, atol=1e-5)
    del model.config["host_timing"]
    assert (model.padded_to(32), model.padded_to(33)) == (None, 64)


def test_the_runner_uses_every_available_core(fp32_artifact, monkeypatch):
    """TVM's default halves the x86 thread count (hyper-threads); the runner asks for every core."""
    import os

    import tvm

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    TvmBackend().load(fp32_artifact.path, {})
    assert tvm.get_global_func("runtime.NumThreads")() == len(os.sched_getaffinity(0))


def test_the_runners_threads_are_not_bound_to_single_cores(fp32_artifact, tmp_path):
    """TVM binds each pool thread to one core by default; on a shared machine a bound thread waits for its own
    core while another is free. The artifact's runner (in a fresh process, TVM_NUM_THREADS set as a user
    would) leaves every thread free to use every core."""
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: nothing to bind")
    script = tmp_path / "check.py"
    script.write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tvm_run import VmModel\n"
        "model = VmModel(sys.argv[1])\n"
        "model.run({model.input_names[0]: np.zeros((64, 1, 8, 8), np.float32)})  # batch 64 starts the pool\n"
        "for task in Path('/proc/self/task').iterdir():\n"
        "    status = (task / 'status').read_text().splitlines()\n"
        "    print(next(line.split(':', 1)[1].strip() for line in status if line.startswith('Cpus_allowed_list')))\n")
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    env.pop("TVM_BIND_THREADS", None)
    done = subprocess.run([sys.executable, str(script), str(fp32_artifact.path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    allowed = os.sched_getaffinity(0)
    lists = done.stdout.split()
    assert len(lists) > 1  # the pool's workers are there
    for cpus in lists:
        assert _cpu_set(cpus) >= allowed, f"a thread is bound to cores {cpus}"


def _cpu_set(text: str) -> set[int]:
    """``0-3,6`` → {0, 1, 2, 3, 6}."""
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def test_unsupported_widths_are_refused_before_emitting(cnn_model, tmp_path):
    from bitpass.frontend import annotation

    backend = TvmBackend()
    conv = next(layer for layer in cnn_model.layers() if layer.op_type == "Conv")
    annotation.set_weight_bits(conv.node, 4)
    problems = backend.legalize(cnn_model, backend.default_target)
    assert any("Conv" in p and "4-bit" in p for p in problems)
    with pytest.raises(BitpassError, match="4-bit weights"):
        compile(cnn_model, tmp_path / "never", backend="tvm", pipeline="optimize", latency=False)
    assert not (tmp_path / "never").exists()


def test_a_mixed_precision_plan_compiles_unchanged_for_tvm(digits_files, tmp_path):
    """The `mixed` pipeline as is: allocation offers only TVM's widths and quantize leaves the lowering to TVM."""
    out = tmp_path / "mixed"
    artifact = compile(digits_files / "model.onnx", out, backend="tvm", calibration=digits_files / "calib.npz",
                       evaluation=digits_files / "eval.npz", latency=False,
                       overrides={"allocate-bits": {"budget": "avg-bits=12"}})
    plan = artifact.manifest["records"]["allocation"]["plan"]
    assert any(bits < 32 for bits in plan.values())
    assert "left to the tvm backend" in artifact.manifest["records"]["quantization"]["format"]
    assert "note" not in artifact.manifest["records"]["quantization"]  # the plan has bits below 32
    assert artifact.metrics["quality"]["accuracy"]["drop_points"] <= 1.0
    assert all(check.ok for check in verify(out, digits_files / "eval.npz"))


def test_the_default_pipeline_says_a_tvm_artifact_without_bits_annotations_is_fp32(digits_files, tmp_path):
    """TVM lowers bits annotations only: the default pipeline sets none, so its artifact is fp32 (where ONNX
    Runtime's would be int8), and the compile says so and how to get int8."""
    messages: list[str] = []
    artifact = compile(digits_files / "model.onnx", tmp_path / "out", backend="tvm",
                       calibration=digits_files / "calib.npz", latency=False, progress=messages.append)
    note = artifact.manifest["records"]["quantization"]["note"]
    assert "fp32" in note and "set-bits(weight=8)" in note
    assert any(note in m for m in messages)
    assert all(v["weight_bits"] == 32 for v in artifact.manifest["records"]["backend"]["layers"].values())


def test_a_cross_target_artifact_is_built_but_not_measured_here(digits_files, tmp_path):
    out = tmp_path / "arm"
    if TvmBackend().runs_on_host("aarch64-neon"):
        pytest.skip("this machine runs aarch64 artifacts natively")
    try:
        artifact = compile(digits_files / "model.onnx", out, backend="tvm", target="aarch64-neon",
                           pipeline="optimize", latency=False)
    except BitpassError as err:
        if "aarch64-linux-gnu-gcc" in str(err) or "cross" in str(err):
            pytest.skip(f"no ARM64 cross compiler here: {err}")
        raise
    assert "not_measured" in artifact.metrics and artifact.metrics["size"]["file"] == "model.so"
    assert (out / "model.so").read_bytes()[18] == 183  # ELF e_machine = EM_AARCH64


def test_runner_reuses_input_tensors_without_aliasing_outputs(fp32_artifact, digits_split):
    runner = TvmBackend().load(fp32_artifact.path)
    x = np.ascontiguousarray(digits_split.eval_x[:2])
    first = runner.run({"input": x[:1]})[0]
    kept = first.copy()
    second = runner.run({"input": x[1:2]})[0]  # same compiled batch: the preallocated input is refilled
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(runner.run({"input": x[:1]})[0], kept)


def test_the_transformer_compiles_fp32_and_with_every_matmul_at_4_bits(trained_transformer, tmp_path):
    """fp32 matches ONNX Runtime; at 4 bits every MatMul runs the integer kernel, the 8-input embedding
    too (its reduction is zero-padded to a whole 32-wide block), and embeddings stay close to fp32."""
    import torch

    from bitpass.backends.measure import cosines
    from bitpass.frontend import from_torch

    module, split = trained_transformer
    model = from_torch(module, (torch.zeros(1, 1, 8, 8),))
    name = model.inputs[0].name
    x = np.ascontiguousarray(split.eval_x[:70])  # one batch-64 call and a padded remainder
    fp32 = compile(model.clone(), tmp_path / "fp32", backend="tvm", pipeline="optimize", latency=False)
    want = reference_runner(model).run({name: x})[0]
    first = lambda outputs: next(iter(outputs.values()))  # noqa: E731 - one output: the embeddings
    np.testing.assert_allclose(first(run(fp32.path, {name: x})), want, rtol=1e-3, atol=1e-4)

    w4 = compile(model, tmp_path / "w4", backend="tvm", pipeline=f"{PIPELINE},set-bits(weight=4)", latency=False)
    layers = json.loads((w4.path / "tvm.json").read_text())["layers"]
    assert len(layers) == 9 and {entry["kernel"] for entry in layers.values()} == {"dense_int4"}
    cosine = float(np.mean(cosines(want, first(run(w4.path, {name: x})))))
    assert cosine > 0.98, cosine


def test_the_build_reports_its_stages_as_one_counted_task(digits_files, tmp_path):
    """A TVM compile takes minutes at real sizes: it says which stage it is in, LLVM's included."""
    lines: list[str] = []
    compile(str(digits_files / "model.onnx"), tmp_path / "cnn", backend="tvm", pipeline="optimize", latency=False,
            progress=lines.append)
    stages = [line for line in lines if line.startswith("tvm")]
    assert stages[0].startswith("tvm build for ") and stages[0].endswith(": 4 stages")
    assert any("compile with LLVM" in line for line in stages)
    assert any("time the library on this machine" in line for line in stages)
