"""Resource bombs: a few bytes that would expand into gigabytes, refused (or kept small) before they expand.

Sizes are simulated: sparse files, a deflate stream built without compressing a gigabyte, and an
address-space limit (RLIMIT_AS) on the bitpass process, so a case that does expand fails loudly
instead of eating the test machine. Each refusal names the cap and what raises it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hostile_kit import (
    add_weight_model,
    deflate_bomb,
    external_tensor,
    io_header,
    make_model,
    npz_with_members,
    refused,
    save_model,
    save_npz,
    succeeded,
    tensor_info,
    user_files,
)
from onnx import TensorProto, helper, numpy_helper

#: address space the bitpass process may use in these cases (torch and ORT loaded need about 3 GiB of it)
MEMORY = {"RLIMIT_AS": 6 << 30}


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(box):
    """300 bytes of anchors: nine levels of nine aliases would construct 9**9 strings (and an 872 MB error)."""
    files = user_files(box)
    lines = ['a0: &a0 ["fold-constants"]']
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    lines.append("passes: *a9")
    (box.work / "bomb.yaml").write_text("\n".join(lines) + "\n")
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", "bomb.yaml", "-q", rlimits=MEMORY,
                     timeout=60)
    refused(box, result, "expands to more than", status=2)
    assert result.seconds < 30


def test_a_recursive_yaml_alias_is_refused(box):
    files = user_files(box)
    (box.work / "loop.yaml").write_text("passes: &p\n  - *p\n")
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", "loop.yaml", "-q", rlimits=MEMORY)
    refused(box, result, "refers to itself|nested", status=2)


def test_a_huge_pipeline_file_is_refused_unread(box):
    files = user_files(box)
    with (box.work / "huge.yaml").open("wb") as handle:
        handle.truncate(3 << 30)  # sparse: 3 GiB of nothing
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", "huge.yaml", "-q", rlimits=MEMORY)
    refused(box, result, "at most", status=2)


def test_a_huge_one_line_spec_is_one_short_line(box):
    files = user_files(box)
    spec = "fold-constants," + ",".join(f"pass-{i}" for i in range(20000))
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", spec, "-q")
    refused(box, result, "unknown pass", status=2)


def test_deeply_nested_spec_values_are_refused(box):
    files = user_files(box)
    spec = "calibrate(percentile=" + "[" * 5000 + "]" * 5000 + ")"
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", spec, "--calib", files["calib"], "-q")
    refused(box, result, "nested", status=2)


def test_an_npz_inflating_to_a_gibibyte_is_refused_before_inflating(box):
    """A real 1 MB .npz whose member inflates to 1 GiB of float32 zeros: refused from its headers."""
    files = user_files(box, calib=False)
    one_feature = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", ["N"])],
                             [tensor_info("y", ["N"])])
    save_model(one_feature, box.work / "flat.onnx")
    deflate_bomb(box.work / "calib.npz")
    assert (box.work / "calib.npz").stat().st_size < 2 << 20
    result = box.run("compile", "flat.onnx", "-o", "out", "--calib", "calib.npz", "-q", rlimits=MEMORY, timeout=60)
    refused(box, result, "BITPASS_MAX_DATA_BYTES", status=2)
    assert result.seconds < 20, "the bomb was inflated"
    assert files


def test_the_data_cap_is_named_and_can_be_lowered(box):
    files = user_files(box, calib=False)
    with (box.work / "calib.npz").open("wb") as handle:
        np.savez_compressed(handle, x=np.zeros((8192, 8), np.float32))  # 256 KiB inflated, tiny on disk
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q",
                     env={"BITPASS_MAX_DATA_BYTES": "64K"})
    refused(box, result, "over the cap of 64.0 KiB.*BITPASS_MAX_DATA_BYTES", status=2)


def test_a_header_declaring_a_huge_array_is_refused_unallocated(box):
    files = user_files(box, calib=False)
    header = io_header((1 << 40, 8), "<f4")
    npz_with_members(box.work / "calib.npz", {"x.npy": header + bytes(1024)})
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q", rlimits=MEMORY)
    refused(box, result, "declares shape|corrupt", status=2)


def test_four_million_calibration_samples_are_capped(box):
    """4 M samples (16 MB of float32, a few KB compressed): refused from the header, naming the option."""
    one_feature = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", ["N", 1])],
                             [tensor_info("y", ["N", 1])])
    save_model(one_feature, box.work / "flat.onnx")
    with (box.work / "calib.npz").open("wb") as handle:
        np.savez_compressed(handle, x=np.zeros((4_000_000, 1), np.float32))
    result = box.run("compile", "flat.onnx", "-o", "out", "--calib", "calib.npz", "-q", rlimits=MEMORY)
    refused(box, result, "4,000,000 samples.*BITPASS_MAX_SAMPLES", status=2)


def test_the_sample_cap_can_be_lowered(box):
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", "out", "--calib", files["calib"], "-q",
                     env={"BITPASS_MAX_SAMPLES": "10"})
    refused(box, result, "over the cap of 10.*BITPASS_MAX_SAMPLES", status=2)


def test_too_many_npz_members_are_refused(box):
    files = user_files(box, calib=False)
    members = {f"a{i}.npy": b"" for i in range(2000)}
    npz_with_members(box.work / "calib.npz", members)
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, "members", status=2)


def _fold_bomb():
    """A 200-byte model: ReduceSum(ConstantOfShape([4096, 4096, 4])) + x; folding makes a 256 MiB tensor."""
    shape = numpy_helper.from_array(np.array([4096, 4096, 4], np.int64), "shape")
    return make_model([helper.make_node("ConstantOfShape", ["shape"], ["big"],
                                        value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
                       helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                       helper.make_node("Add", ["x", "s"], ["y"])],
                      [tensor_info("x", ["N", 2])], [tensor_info("y", ["N", 2])], [shape])


def test_constant_folding_never_turns_a_tiny_model_into_a_huge_one(box):
    save_model(_fold_bomb(), box.work / "model.onnx")
    assert (box.work / "model.onnx").stat().st_size < 300
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--no-latency",
                     rlimits=MEMORY)
    succeeded(box, result, creates=["out"])
    assert (box.work / "out" / "model.onnx").stat().st_size < 10_000
    assert "fold-constants(max_added_bytes=N)" in result.stderr, result.stderr  # the message names the option
    manifest = json.loads((box.work / "out" / "manifest.json").read_text())
    assert manifest["records"]["fold-constants"]["kept_computed"][0]["bytes"] == 256 << 20


def test_the_folding_cap_can_be_raised(box):
    save_model(_fold_bomb(), box.work / "model.onnx")
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline",
                     "fold-constants(max_added_bytes=300000000),eliminate-dead-nodes", "--no-latency", "-q",
                     rlimits=MEMORY, timeout=180)
    succeeded(box, result, creates=["out"])
    from onnx import load

    assert "ConstantOfShape" not in [n.op_type for n in load(box.work / "out" / "model.onnx").graph.node]


def test_external_data_past_the_memory_limit_is_refused_unread(box):
    """A 2.2 GiB external-data file (sparse: no disk, no memory) under a 6 GiB address-space limit: compiling would
    hold it about three times, so it is refused before any of it is read (models over 2 GiB are otherwise taken)."""
    folder = box.work / "m"
    folder.mkdir()
    count = (2200 << 20) // 4
    with (folder / "weights.bin").open("wb") as handle:
        handle.truncate(count * 4)
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor_info("x", ["N", count])],
                       [tensor_info("y", ["N", count])], [external_tensor("w", [count], "weights.bin")])
    save_model(model, folder / "model.onnx")
    result = box.run("compile", "m/model.onnx", "-o", "out", "--pipeline", "optimize", "-q", rlimits=MEMORY,
                     timeout=60)
    refused(box, result, "more memory", status=1)
    assert result.seconds < 20


def test_an_onnx_file_over_two_gibibytes_is_refused_unread(box):
    with (box.work / "model.onnx").open("wb") as handle:
        handle.write(b"\x08\x07")
        handle.truncate(2300 << 20)
    result = box.run("compile", "model.onnx", "-o", "out", "-q", rlimits=MEMORY, timeout=60)
    refused(box, result, "2 GiB", status=1)


def test_many_external_tensors_adding_up_past_the_memory_limit_are_refused(box):
    folder = box.work / "m"
    folder.mkdir()
    per = (600 << 20) // 4
    with (folder / "weights.bin").open("wb") as handle:
        handle.truncate(per * 4 * 4)
    tensors = [external_tensor(f"w{i}", [per], "weights.bin", offset=i * per * 4, length=per * 4) for i in range(4)]
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(4)]
    model = make_model(nodes, [tensor_info("x", ["N", per])], [tensor_info("y3", ["N", per])], tensors)
    save_model(model, folder / "model.onnx")
    result = box.run("compile", "m/model.onnx", "-o", "out", "--pipeline", "optimize", "-q", rlimits=MEMORY)
    refused(box, result, "more memory", status=1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_as_the_model_is_refused_without_blocking(box):
    os.mkfifo(box.work / "model.onnx")
    result = box.run("compile", "model.onnx", "-o", "out", "-q", timeout=30)
    refused(box, result, "model.onnx", status=(1, 2))


def test_dev_zero_as_calibration_data_is_refused_without_reading_forever(box):
    files = user_files(box, calib=False)
    os.symlink("/dev/zero", box.work / "calib.npz")
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q", timeout=30,
                     rlimits=MEMORY)
    refused(box, result, "calib.npz", status=2)


def test_external_weights_far_bigger_than_the_model_declares_are_refused(box):
    """A 64-float weight whose file is 1 GiB (sparse) without a length: refused from the sizes."""
    (box.work / "m").mkdir()
    with (box.work / "m" / "weights.bin").open("wb") as handle:
        handle.truncate(1 << 30)
    save_model(add_weight_model(external_tensor("w", [64], "weights.bin")), box.work / "m" / "model.onnx")
    save_npz(box.work / "x.npz", x=np.zeros((1, 64), np.float32))
    result = box.run("compile", "m/model.onnx", "-o", "out", "--pipeline", "optimize", "-q", rlimits=MEMORY)
    refused(box, result, "needs 256", status=1)
