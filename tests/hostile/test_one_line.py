"""Tracebacks instead of one line: every bad input below once ended in a traceback (or a page of text).

Each must end with one line naming the cause, a non-zero exit, and nothing left behind.
"""

from __future__ import annotations

import json
import os
import resource
import zipfile

import numpy as np
import onnx
import pytest
from hostile_kit import (
    succeeded,
    add_weight_model,
    artifact,
    external_tensor,
    io_header,
    make_model,
    mlp,
    npy_bytes,
    npz_with_members,
    refused,
    samples,
    save_model,
    save_npz,
    tensor_info,
    user_files,
    weights,
)
from onnx import TensorProto, helper

# --- bad external data (onnx raises ValueError, not OSError) --------------------------------------


def _external(box, *, data: bytes, offset: int | None = None, length: int | None = None,
              location: str = "weights.bin", key: tuple[str, str] | None = None):
    folder = box.work / "m"
    folder.mkdir(exist_ok=True)
    (folder / "weights.bin").write_bytes(data)
    tensor = external_tensor("w", [64], location, offset, length)
    if key:
        tensor.external_data.add(key=key[0], value=key[1])
    return save_model(add_weight_model(tensor), folder / "model.onnx")


@pytest.mark.parametrize("case, kwargs, match", [
    ("length-past-end", {"data": bytes(256), "length": 4096}, "past the end|runs past"),
    ("offset-past-end", {"data": bytes(256), "offset": 10_000}, "past the end"),
    ("nul-in-location", {"data": bytes(256), "location": "weights.bin\0../../outside/secret.bin"}, "NUL"),
    ("short-file", {"data": bytes(100)}, "needs 256|holds 100"),
    ("length-not-matching-shape", {"data": bytes(512), "length": 512}, "needs 256"),
    ("negative-offset", {"data": bytes(256), "offset": -4}, "offset"),
    ("offset-not-a-number", {"data": bytes(256), "key": ("offset", "twelve")}, "not integers|offset"),
    ("unknown-key", {"data": bytes(256), "key": ("compression", "zstd")}, "unknown external-data key"),
    ("empty-location", {"data": bytes(256), "location": ""}, "empty"),
    ("location-is-a-folder", {"data": bytes(256), "location": "."}, "missing|not a regular file|outside"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_external_data_is_one_line(box, case, kwargs, match):
    model = _external(box, **kwargs)
    result = box.run("compile", model, "-o", "out", "--pipeline", "optimize", "-q")
    refused(box, result, match, status=1)


# --- filesystem errors creating or writing the output ----------------------------------------------


def _compile(box, *extra):
    files = user_files(box)
    return box.run("compile", files["model"], "--calib", files["calib"], "--no-latency", "-q", *extra)


def test_output_parent_is_a_file(box):
    user_files(box)
    (box.work / "notes.txt").write_text("mine\n")
    result = _compile(box, "-o", "notes.txt/out")
    refused(box, result, "notes.txt", status=(1, 2))


def test_missing_output_parents_are_created(box):
    """`-o out/sub` makes the missing folders (issue #13), inside the working folder and nowhere else."""
    result = _compile(box, "-o", "no/such/folder/out")
    succeeded(box, result, creates=["no"])
    assert (box.work / "no/such/folder/out/manifest.json").is_file()


def test_missing_output_parents_made_for_a_failing_compile_are_removed_again(box):
    result = _compile(box, "-o", "no/such/folder/out", "--pipeline", "no-such-pass")
    refused(box, result, "no-such-pass", status=2)
    assert not (box.work / "no").exists()


def test_output_name_too_long(box):
    result = _compile(box, "-o", "a" * 300)
    refused(box, result, "too long|name", status=(1, 2))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_read_only_folder(box):
    (box.work / "locked").mkdir()
    (box.work / "locked").chmod(0o555)
    try:
        result = _compile(box, "-o", "locked/out")
        refused(box, result, "permission|read-only|cannot", status=(1, 2))
    finally:
        (box.work / "locked").chmod(0o755)


def test_disk_full_while_writing_the_artifact(box):
    """RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk does (Python ignores SIGXFSZ)."""
    files = user_files(box)
    big = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor_info("x", ["N", 256])],
                     [tensor_info("y", ["N", 256])], [weights([256, 256], "w")])
    save_model(big, box.work / "big.onnx")
    result = box.run("compile", "big.onnx", "-o", "out", "--pipeline", "optimize", "--no-latency", "-q",
                     rlimits={"RLIMIT_FSIZE": 1 << 16})
    refused(box, result, "space|too large|write|disk", status=1)
    assert files


def test_output_is_the_current_folder(box):
    result = _compile(box, "-o", ".")
    refused(box, result, status=(1, 2))


# --- errors while measuring ------------------------------------------------------------------------


def test_onnx_runtime_run_error_while_measuring(box):
    """Reshape to (-1, 3) of 4 features: loads fine, fails on the first batch."""
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [tensor_info("x", ["N", 4])],
                       [tensor_info("y", ["M", 3])],
                       [onnx.numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    save_model(model, box.work / "model.onnx")
    save_npz(box.work / "eval.npz", x=np.ones((1, 4), np.float32))
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--eval", "eval.npz",
                     "--no-latency", "-q")
    refused(box, result, "onnx runtime|reshape|run", status=1)


def test_scalar_output_with_evaluation_data(box):
    model = make_model([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], [tensor_info("x", ["N", 4])],
                       [tensor_info("y", [])])
    save_model(model, box.work / "model.onnx")
    save_npz(box.work / "eval.npz", x=np.ones((8, 4), np.float32))
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--eval", "eval.npz",
                     "--no-latency", "-q")
    if result.status != 0:
        refused(box, result, "scalar|output|batch|sample", status=(1, 2))


@pytest.mark.parametrize("labels", [np.zeros((24, 2), np.int64), np.full(24, 0.5), np.array(["a"] * 24)],
                         ids=["shape-Nx2", "fractional", "strings"])
def test_labels_that_are_not_class_indices(box, labels):
    files = user_files(box, evaluation=False)
    save_npz(box.work / "eval.npz", **{**samples(24, seed=2, labels=None), "labels": labels})
    result = box.run("compile", files["model"], "-o", "out", "--calib", files["calib"], "--eval", "eval.npz",
                     "--no-latency", "-q")
    refused(box, result, "labels", status=2)


# --- corrupt .npz files ----------------------------------------------------------------------------


def _good_npy(count: int = 32) -> bytes:
    return npy_bytes(samples(count, labels=None)["x"])


def _corrupt_headers() -> dict[str, bytes]:
    good = _good_npy()
    return {
        "header-garbage": good[:10] + b"{'descr': <f4, shape: (32 8)}".ljust(len(good) - 10 - 256 * 4, b" ")[:118]
        + good[128:],
        "bad-magic": b"\x93NUMPX" + good[6:],
        "version-9": good[:6] + b"\x09\x00" + good[8:],
        "header-length-huge": good[:8] + b"\xff\xff" + good[10:],
        "header-length-huge-v2": b"\x93NUMPY\x02\x00" + (1 << 31).to_bytes(4, "little") + good[10:],
        "shape-overflow": io_header((1 << 62, 1 << 62), "<f4") + good[128:],
        "shape-negative": good[:128].replace(b"(32, 8)", b"(-3, 8)") + good[128:],
        "truncated-data": good[: len(good) // 2],
        "extra-data": good + bytes(100),
        "not-npy-at-all": b"hello, I am a text file\n" * 4,
        "unknown-dtype": good[:128].replace(b"'<f4'", b"'<q9'") + good[128:],
    }


@pytest.mark.parametrize("case", sorted(_corrupt_headers()))
def test_corrupt_npy_members_are_one_line_not_blamed_on_pickle(box, case):
    files = user_files(box, calib=False)
    npz_with_members(box.work / "calib.npz", {"x.npy": _corrupt_headers()[case]})
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    line = refused(box, result, "calib.npz", status=2)
    assert "pickl" not in line.lower(), line


def test_a_corrupt_deflate_stream_is_one_line(box):
    """zlib.error from inside the zip: bytes flipped in the middle of a compressed member."""
    files = user_files(box, calib=False)
    path = box.work / "calib.npz"
    with path.open("wb") as handle:
        np.savez_compressed(handle, x=np.random.default_rng(0).standard_normal((512, 8)).astype(np.float32))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, "calib.npz", status=2)


def test_a_crc_mismatch_is_one_line(box):
    files = user_files(box, calib=False)
    path = npz_with_members(box.work / "calib.npz", {"x.npy": _good_npy()})
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # inside the stored array data, before the central directory
    path.write_bytes(bytes(data))
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, "calib.npz", status=2)


@pytest.mark.parametrize("members", [
    {"x.txt": b"not an array"},
    {"x.npy": b"", "x/": b""},
    {},
], ids=["not-npy", "empty-member-and-folder", "no-members"])
def test_odd_zip_members_are_one_line(box, members):
    files = user_files(box, calib=False)
    npz_with_members(box.work / "calib.npz", members)
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, "calib.npz", status=2)


def test_duplicate_members_are_one_line(box):
    files = user_files(box, calib=False)
    path = box.work / "calib.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", _good_npy())
        archive.writestr("x.npy", _good_npy(16))
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, "twice|corrupt", status=2)


def test_a_truncated_npz_is_one_line(box):
    files = user_files(box, calib=False)
    path = save_npz(box.work / "calib.npz", **samples(64, labels=None))
    path.write_bytes(path.read_bytes()[:300])
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, "calib.npz", status=2)


# --- pipeline files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content", [
    ("latin1.yaml", "passes:\n  - fold-constants # caf\xe9\n".encode("latin-1")),
    ("utf16.yaml", "passes:\n  - fold-constants\n".encode("utf-16")),
    ("nested.yaml", b"passes: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("nested-map.yaml", b"passes:\n  - calibrate: " + b"{a: " * 3000 + b"1" + b"}" * 3000 + b"\n"),
    ("nested.toml", b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("binary.toml", bytes(range(256)) * 4),
    ("tabs.yaml", b"passes:\n\t- fuse\n"),
    ("list.yaml", b"- fold-constants\n- fuse\n"),
    ("null.yaml", b"passes:\n  - null\n"),
    ("number-name.yaml", b"passes:\n  - 42\n"),
    ("options-list.yaml", b"passes:\n  - calibrate: [1, 2]\n"),
    ("empty.toml", b""),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_pipeline_files_are_one_line(box, name, content):
    files = user_files(box)
    (box.work / name).write_bytes(content)
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", name, "--calib", files["calib"], "-q")
    refused(box, result, name.replace(".", r"\."), status=2)


# --- malformed manifests in verify / inspect / run -------------------------------------------------------


def _set_manifest(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    result = edit(manifest)
    path.write_text(result if isinstance(result, str) else json.dumps(manifest if result is None else result))


MANIFEST_EDITS = {
    "not-json": lambda m: "{not json",
    "a-list": lambda m: [1, 2, 3],
    "no-schema": lambda m: m.pop("schema"),
    "schema-string": lambda m: m.update(schema="1"),
    "files-a-list": lambda m: m.update(files=["model.onnx"]),
    "files-entry-not-a-dict": lambda m: m["files"].update({"model.onnx": "abc"}),
    "layers-not-a-list": lambda m: m.update(layers={"a": 1}),
    "layer-missing-keys": lambda m: m.update(layers=[{}]),
    "backend-unknown": lambda m: m.update(backend="../../evil"),
    "inputs-missing": lambda m: m.pop("inputs"),
    "metrics-null": lambda m: m.update(metrics=None),
    "huge-number": lambda m: m.update(schema=10 ** 4000),
}


@pytest.mark.parametrize("command", ["verify", "inspect", "run"])
@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_malformed_manifests_are_one_line(box, command, edit):
    folder = artifact(box)
    _set_manifest(folder, MANIFEST_EDITS[edit])
    save_npz(box.work / "x.npz", **samples(4, labels=None))
    argv = {"verify": ["verify", "art"], "inspect": ["inspect", "art"],
            "run": ["run", "art", "--input", "x.npz", "-o", "y.npz"]}[command]
    result = box.run(*argv)
    if result.status == 0 and command == "inspect":
        return  # inspect may show what it can; it must not crash
    refused(box, result, status=(1, 2))


@pytest.mark.parametrize("config", [
    {"graph_optimization_level": "__class__"},
    {"graph_optimization_level": 3},
    {"intra_op_num_threads": "many"},
    {"execution_mode": None},
    [1, 2],
    {"disabled_optimizers": ["SkipLayerNormFusion;ep.context_enable"]},
    {"disabled_optimizers": "SkipLayerNormFusion"},
], ids=["level-dunder", "level-int", "threads-string", "mode-null", "a-list", "optimizer-smuggles-a-key",
        "optimizers-not-a-list"])
def test_a_hostile_session_json_is_one_line(box, config):
    folder = artifact(box)
    (folder / "session.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "manifest.json").read_text())
    if "session.json" in manifest["files"]:  # an attacker recomputes the hash
        import hashlib

        data = (folder / "session.json").read_bytes()
        manifest["files"]["session.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    save_npz(box.work / "x.npz", **samples(4, labels=None))
    result = box.run("run", "art", "--input", "x.npz", "-o", "y.npz")
    refused(box, result, status=(1, 2))


# --- models that are not what they claim -----------------------------------------------------------------


def _mlp_with(edit):
    model = mlp()
    edit(model)
    return model


MODELS = {
    "opset-99": lambda: _mlp_with(lambda m: m.opset_import[0].__setattr__("version", 99)),
    "opset-1": lambda: _mlp_with(lambda m: m.opset_import[0].__setattr__("version", 1)),
    "ir-version-99": lambda: _mlp_with(lambda m: setattr(m, "ir_version", 99)),
    "unknown-op": lambda: _mlp_with(lambda m: m.graph.node[2].__setattr__("op_type", "Rleu")),
    "unknown-domain": lambda: _mlp_with(lambda m: m.graph.node[2].__setattr__("domain", "com.example.secret")),
    "cycle": lambda: _mlp_with(lambda m: m.graph.node[0].input.__setitem__(0, "y")),
    "dangling-input": lambda: _mlp_with(lambda m: m.graph.node[1].input.__setitem__(1, "nowhere")),
    "no-outputs": lambda: _mlp_with(lambda m: m.graph.ClearField("output")),
    "duplicate-node-output": lambda: _mlp_with(lambda m: m.graph.node[1].output.__setitem__(0, "h")),
    "weight-wrong-size": lambda: _mlp_with(lambda m: m.graph.initializer[0].dims.__setitem__(0, 9)),
    "string-input": lambda: make_model([helper.make_node("Identity", ["x"], ["y"])],
                                       [tensor_info("x", ["N", 2], TensorProto.STRING)],
                                       [tensor_info("y", ["N", 2], TensorProto.STRING)]),
    "no-graph": lambda: onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)]),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_broken_models_are_one_line(box, case):
    save_model(MODELS[case](), box.work / "model.onnx")
    save_npz(box.work / "calib.npz", **samples(16, labels=None))
    result = box.run("compile", "model.onnx", "-o", "out", "--calib", "calib.npz", "--no-latency", "-q")
    refused(box, result, status=(1, 2))


@pytest.mark.parametrize("what", ["not-onnx", "empty", "directory-without-manifest"])
def test_inspect_on_things_that_are_not_models_is_one_line(box, what):
    if what == "not-onnx":
        (box.work / "thing").write_text("hello\n")
    elif what == "empty":
        (box.work / "thing").write_bytes(b"")
    else:
        (box.work / "thing").mkdir()
        (box.work / "thing" / "index.html").write_text("<html></html>\n")
    result = box.run("inspect", "thing")
    refused(box, result, "thing", status=(1, 2))


# --- odd command lines -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["compile", "model.onnx"],                       # no -o
    ["compile", "model.onnx", "-o", "out", "--frobnicate"],
    ["compile", "model.onnx", "-o", "out", "--seed", "many"],
    ["frobnicate"],
    [],
], ids=["missing-output", "unknown-flag", "bad-seed", "unknown-command", "no-command"])
def test_bad_command_lines_are_one_line(box, argv):
    user_files(box)
    result = box.run(*argv)
    refused(box, result, status=2)


def test_data_cap_env_var_with_a_bad_value_is_one_line(box):
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", "out", "--calib", files["calib"], "-q",
                     env={"BITPASS_MAX_DATA_BYTES": "lots"})
    refused(box, result, "BITPASS_MAX_DATA_BYTES", status=2)


def test_resource_limit_helper_is_real():
    """The disk-full case relies on Python ignoring SIGXFSZ: writes past RLIMIT_FSIZE then raise EFBIG."""
    import signal

    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    assert resource.RLIMIT_FSIZE is not None
