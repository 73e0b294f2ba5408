"""Edge verification: the CNN cross-compiled for aarch64 on this machine runs under qemu-aarch64 with an
arm64 TVM runtime, and its outputs match the x86 build's."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")

from bitpass.backends.tvm import TvmBackend, emulate  # noqa: E402
from bitpass.frontend.errors import BitpassError  # noqa: E402

TOOLCHAIN, MISSING = emulate.find_toolchain()


def test_the_toolchain_is_there_where_ci_installed_it():
    """``.ci/run`` sets BITPASS_REQUIRE_ARM64=1 after ``tools/setup_arm64.sh`` succeeded: from then on
    a toolchain that cannot be found is a failure, so the emulation tests below cannot silently skip."""
    if os.environ.get("BITPASS_REQUIRE_ARM64") != "1":
        pytest.skip("BITPASS_REQUIRE_ARM64 is not set (only .ci/run requires the ARM64 toolchain)")
    assert TOOLCHAIN is not None, f"ARM64 emulation unavailable after setup: {MISSING}"
    assert shutil.which("aarch64-linux-gnu-gcc") is not None


def test_cross_compiling_needs_no_emulator(tmp_path, cnn_model):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu, "
                    "or tools/setup_arm64.sh)")
    backend = TvmBackend()
    files = backend.emit(cnn_model, tmp_path, "aarch64-neon")
    assert "model.so" in files
    assert (tmp_path / "model.so").read_bytes()[:4] == b"\x7fELF"
    assert (tmp_path / "model.so").read_bytes()[18] == 183  # e_machine EM_AARCH64
    assert json.loads((tmp_path / "tvm.json").read_text())["target"] == "aarch64-neon"
    with pytest.raises(BitpassError, match="--emulate"):
        backend.load(tmp_path, {})


@pytest.mark.skipif(TOOLCHAIN is None, reason=f"ARM64 emulation unavailable: {MISSING}")
def test_aarch64_artifact_under_qemu_matches_the_x86_build(tmp_path, cnn_model, digits_split):
    backend = TvmBackend()
    arm, x86 = tmp_path / "arm", tmp_path / "x86"
    arm.mkdir()
    x86.mkdir()
    backend.emit(cnn_model, arm, "aarch64-neon")
    backend.emit(cnn_model.clone(), x86, backend.default_target)
    x = np.ascontiguousarray(digits_split.eval_x[:70])  # one batch-64 call and a padded one
    names = json.loads((arm / "tvm.json").read_text())["outputs"]
    emulated = emulate.run(arm, {"input": x}, names)
    native = backend.load(x86, {}).run({"input": x})
    np.testing.assert_allclose(emulated[0], native[0], rtol=1e-3, atol=1e-5)
    assert (emulated[0].argmax(1) == native[0].argmax(1)).all()


@pytest.mark.skipif(TOOLCHAIN is None, reason=f"ARM64 emulation unavailable: {MISSING}")
def test_verify_emulate_checks_a_quantized_aarch64_artifact_against_the_host_build(tmp_path, digits_files, capsys):
    from bitpass.tools.cli import main

    out = tmp_path / "arm"
    assert main(["compile", str(digits_files / "model.onnx"), "--calib", str(digits_files / "calib.npz"), "-o",
                 str(out), "--backend", "tvm", "--target", "aarch64-neon", "--budget", "avg-bits=12", "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--eval", str(digits_files / "eval.npz")]) == 0
    assert "verify --emulate" in capsys.readouterr().out  # not runnable here: says how to check it
    assert main(["verify", str(out), "--eval", str(digits_files / "eval.npz"), "--emulate"]) == 0
    assert "top-1 agreement 1.0000" in capsys.readouterr().out
