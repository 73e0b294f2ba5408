"""`bitpass run`: outputs by name whatever they are called; a hostile artifact cannot read files outside it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bitpass.backends import artifact as artifact_io
from bitpass.tools.cli import main

SECRET = np.arange(4, dtype=np.float32) + 1234.5


def sealed_artifact(folder, model: onnx.ModelProto, extra_files: tuple[str, ...] = ()):
    """An artifact folder holding ``model`` with a manifest that seals it, as bitpass would write it."""
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    manifest = {"schema": artifact_io.MANIFEST_SCHEMA, "backend": "onnxruntime", "target": "cpu", "layers": [],
                "inputs": [{"name": "x", "shape": ["n", 4], "dtype": "float32"}],
                "outputs": [{"name": o.name, "shape": ["n", 4], "dtype": "float32"} for o in model.graph.output],
                "files": artifact_io.file_table(folder, ["model.onnx", *extra_files])}
    artifact_io.write_manifest(folder, manifest)
    return folder


def add_model(outputs: list[str]) -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "x"], [name]) for name in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_outputs_with_any_name_are_written_even_allow_pickle(tmp_path):
    artifact = sealed_artifact(tmp_path / "a", add_model(["allow_pickle", "file", "y"]))
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    assert main(["run", str(artifact), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 0
    with np.load(tmp_path / "y.npz") as out:
        assert sorted(out.files) == ["allow_pickle", "file", "y"]
        assert np.array_equal(out["allow_pickle"], np.full((2, 4), 2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.npz", "y.npz"]


def test_a_failed_run_leaves_no_partial_output(tmp_path, capsys):
    artifact = sealed_artifact(tmp_path / "a", add_model(["y"]))
    np.savez(tmp_path / "x.npz", x=np.ones((2, 5), np.float32))  # wrong width
    assert main(["run", str(artifact), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.npz"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_run_does_not_overwrite_a_file_that_is_not_an_npz(tmp_path, capsys):
    artifact = sealed_artifact(tmp_path / "a", add_model(["y"]))
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["run", str(artifact), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "notes.txt")]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("location", ["../secret.bin", "/SECRET_ABS", "sub/../../secret.bin"])
def test_external_data_outside_the_artifact_is_never_read(tmp_path, monkeypatch, capsys, location):
    """A relative path would resolve against the current folder if ORT got the model as bytes."""
    (tmp_path / "secret.bin").write_bytes(SECRET.tobytes())
    location = location.replace("/SECRET_ABS", str(tmp_path / "secret.bin"))
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], vals=[0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    weight.external_data.add(key="length", value="16")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    artifact = sealed_artifact(tmp_path / "art", model)
    (tmp_path / "art" / "secret.bin").write_bytes(b"")  # decoy so a resolver looking inside finds nothing useful
    (tmp_path / "art" / "secret.bin").unlink()
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 4), np.float32))
    monkeypatch.chdir(tmp_path / "art")  # where a bytes-loaded model would resolve "../secret.bin" from
    code = main(["run", str(artifact), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")])
    err = capsys.readouterr().err
    assert code == 1 and "outside the model's folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y.npz").exists()
