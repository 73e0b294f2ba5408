"""Security: nothing outside the working folder is read, nothing is unpickled, nothing is imported unasked.

The canary (outside/secret.bin, distinctive float32 bytes) is the target of every escape: a case
passes only if those bytes appear in no output, log, temporary file or message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from hostile_kit import (
    add_weight_model,
    artifact,
    external_tensor,
    has_traceback,
    npy_bytes,
    npz_with_members,
    pickle_payload,
    refused,
    save_model,
    save_npz,
    succeeded,
    user_files,
)

# --- external data that escapes the model's folder ---------------------------------------------


def _escape_model(box, location: str):
    """work/m/model.onnx whose 64-float weight lives at ``location`` (relative to work/m)."""
    folder = box.work / "m"
    save_model(add_weight_model(external_tensor("w", [64], location)), folder / "model.onnx")
    return folder / "model.onnx"


@pytest.mark.parametrize("location", [
    "ABSOLUTE",                        # the canary's absolute path
    "../../outside/secret.bin",        # climbing out with ..
    "sub/../../../outside/secret.bin",  # a detour that still climbs out
    "../../../../../../../../dev/zero",  # a device, reached relatively
    "/dev/zero",
], ids=["absolute", "dotdot", "detour", "relative-device", "absolute-device"])
def test_external_data_outside_the_model_folder_is_never_read(box, location):
    location = str(box.canary) if location == "ABSOLUTE" else location
    model = _escape_model(box, location)
    (box.work / "m" / "sub").mkdir()
    result = box.run("compile", model, "-o", "out", "--pipeline", "optimize", "-q")
    refused(box, result, "outside the model's folder", status=1)


def test_external_data_through_a_symlink_leading_out_is_never_read(box):
    model = _escape_model(box, "weights.bin")
    os.symlink(box.canary, box.work / "m" / "weights.bin")
    result = box.run("compile", model, "-o", "out", "--pipeline", "optimize", "-q")
    refused(box, result, "outside the model's folder", status=1)


def test_external_data_through_a_symlinked_folder_is_never_read(box):
    model = _escape_model(box, "data/secret.bin")
    os.symlink(box.outside, box.work / "m" / "data")
    result = box.run("compile", model, "-o", "out", "--pipeline", "optimize", "-q")
    refused(box, result, "outside the model's folder", status=1)


def test_external_data_that_is_a_fifo_is_refused_without_blocking(box):
    model = _escape_model(box, "pipe.bin")
    os.mkfifo(box.work / "m" / "pipe.bin")
    result = box.run("compile", model, "-o", "out", "--pipeline", "optimize", "-q", timeout=60)
    refused(box, result, "missing|not a regular file", status=1)


def test_external_data_inside_the_folder_is_read(box):
    """The control: the same model with its weights beside it compiles, the weights as given."""
    weights = np.linspace(-1, 1, 64, dtype=np.float32)
    (box.work / "m").mkdir()
    (box.work / "m" / "weights.bin").write_bytes(weights.tobytes())
    model = save_model(add_weight_model(external_tensor("w", [64], "weights.bin")), box.work / "m" / "model.onnx")
    save_npz(box.work / "x.npz", x=np.zeros((2, 64), np.float32))
    result = box.run("compile", model, "-o", "out", "--pipeline", "optimize", "--no-latency", "-q")
    succeeded(box, result, creates=["out"])
    run = box.run("run", "out", "--input", "x.npz", "-o", "y.npz")
    succeeded(box, run, creates=["y.npz"])
    assert np.array_equal(np.load(box.work / "y.npz")["y"][0], weights)


# --- artifacts that point outside --------------------------------------------------------------


def _rehash(folder, manifest=None):
    """What an attacker does after editing an artifact: recompute the manifest's file hashes and re-seal the
    manifest (its digest file), so that only the model's own contents can give the attack away."""
    manifest = manifest or json.loads((folder / "manifest.json").read_text())
    for name in list(manifest.get("files", {})):
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (folder / "manifest.json").write_text(text)
    (folder / "manifest.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  manifest.json\n")
    return manifest


def _hostile_artifact(box, location: str):
    """A genuine artifact whose model.onnx was rewritten to take its weight from ``location``."""
    box.run("compile", _plain_add_model(box), "-o", "art", "--pipeline", "optimize", "--no-latency", "-q")
    folder = box.work / "art"
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "w")
    weight.CopyFrom(external_tensor("w", [64], location))
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    _rehash(folder)
    save_npz(box.work / "x.npz", x=np.zeros((2, 64), np.float32))
    return folder


def _plain_add_model(box):
    weight = onnx.numpy_helper.from_array(np.ones(64, np.float32), "w")
    return save_model(add_weight_model(weight), box.work / "add.onnx")


@pytest.mark.parametrize("location", ["RELATIVE", "ABSOLUTE"])
def test_run_never_reads_external_data_outside_the_artifact(box, location):
    """Given model bytes, ORT resolves a relative external-data path against the current directory:
    from work/, ``../outside/secret.bin`` is the canary."""
    _hostile_artifact(box, "../outside/secret.bin" if location == "RELATIVE" else str(box.canary))
    result = box.run("run", "art", "--input", "x.npz", "-o", "y.npz")
    refused(box, result, "outside|external", status=(1, 2))


@pytest.mark.parametrize("entry", ["../outside/secret.bin", "../../outside/secret.bin", "ABSOLUTE", "LINK"])
def test_verify_never_opens_manifest_files_outside_the_artifact(box, entry):
    folder = artifact(box)
    if entry == "ABSOLUTE":
        entry = str(box.canary)
    elif entry == "LINK":
        os.symlink(box.canary, folder / "extra.bin")
        entry = "extra.bin"
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256(box.canary.read_bytes()).hexdigest()
    manifest["files"][entry] = {"sha256": digest, "bytes": box.canary.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    box.take_snapshot()
    result = box.run("verify", folder.name, snapshot_first=False)
    assert result.status != 0, f"verify accepted a files entry outside the artifact:\n{result.describe()}"
    assert not has_traceback(result.stderr), result.describe()
    # the path outside must not have been opened: a hash it could only compute by reading the canary
    assert "all files match" not in result.stdout, result.describe()


# --- nothing is unpickled ------------------------------------------------------------------------


def test_a_pickle_given_as_the_model_is_never_unpickled(box):
    marker = box.outside / "unpickled"
    (box.work / "model.onnx").write_bytes(pickle_payload(marker))
    result = box.run("compile", "model.onnx", "-o", "out", "-q")
    refused(box, result, "pickle|checkpoint", status=1)
    assert not marker.exists()


def test_a_torch_zip_checkpoint_given_as_the_model_is_never_unpickled(box):
    marker = box.outside / "unpickled"
    npz_with_members(box.work / "model.onnx", {"archive/data.pkl": pickle_payload(marker),
                                               "archive/version": b"3\n"})
    result = box.run("compile", "model.onnx", "-o", "out", "-q")
    refused(box, result, "pickle|checkpoint", status=1)
    assert not marker.exists()


def _calibration_refused_unread(box, files, marker, message):
    """Compiling with the hostile calib.npz is refused in one line (exit 2) and its pickle never runs."""
    result = box.run("compile", files["model"], "-o", "out", "--calib", "calib.npz", "-q")
    refused(box, result, message, status=2)
    assert not marker.exists()


def test_object_arrays_in_npz_are_never_unpickled(box):
    marker = box.outside / "unpickled"
    files = user_files(box, calib=False)
    payload = np.empty(4, dtype=object)
    payload[:] = [pickle_payload(marker)] * 4
    with (box.work / "calib.npz").open("wb") as handle:
        np.savez(handle, x=payload)
    _calibration_refused_unread(box, files, marker, "pickle|objects")


def test_a_raw_pickle_named_like_an_array_is_never_unpickled(box):
    marker = box.outside / "unpickled"
    files = user_files(box, calib=False)
    npz_with_members(box.work / "calib.npz", {"x.npy": pickle_payload(marker)})
    _calibration_refused_unread(box, files, marker, "corrupt|header|not a")


def test_an_npy_header_declaring_objects_is_refused_unread(box):
    marker = box.outside / "unpickled"
    files = user_files(box, calib=False)
    header = npy_bytes(np.zeros(1, np.float32))
    header = header.replace(b"'<f4'", b"'|O' ")
    npz_with_members(box.work / "calib.npz", {"x.npy": header[:128] + pickle_payload(marker)})
    _calibration_refused_unread(box, files, marker, "pickle|objects|corrupt")


def test_yaml_pipelines_cannot_run_python(box):
    marker = box.outside / "ran"
    files = user_files(box)
    (box.work / "pipeline.yaml").write_text(
        f"passes:\n  - !!python/object/apply:os.system ['touch {marker}']\n")
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", "pipeline.yaml", "-q")
    refused(box, result, "pipeline.yaml", status=2)
    assert not marker.exists()


# --- nothing is imported unasked -----------------------------------------------------------------

PLANTED = ["passes", "frontend", "backends", "plugins", "tools", "bitpass", "bitpass_plugin", "yaml_plugin"]


def test_modules_planted_in_the_working_folder_are_never_imported(box):
    """The console script must not import bare ``passes``/``frontend`` (or anything) from the cwd."""
    marker = box.outside / "imported"
    files = user_files(box)
    for name in PLANTED:
        (box.work / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
        (box.work / name).mkdir(exist_ok=True) if name in ("passes", "frontend") else None
        if name in ("passes", "frontend"):
            (box.work / name / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    result = box.run("compile", files["model"], "-o", "out", "--calib", files["calib"], "--eval", files["eval"],
                     "--no-latency", "-q", fresh=True)
    succeeded(box, result, creates=["out"])
    assert not marker.exists(), f"imported from the working folder: {marker.read_text()}"


def test_a_plugin_file_in_the_working_folder_is_not_loaded_unless_named(box):
    marker = box.outside / "imported"
    files = user_files(box)
    (box.work / "my_passes.py").write_text(f"open({str(marker)!r}, 'w')\n")
    result = box.run("compile", files["model"], "-o", "out", "--pipeline", "optimize", "--no-latency", "-q")
    succeeded(box, result, creates=["out"])
    assert not marker.exists()
