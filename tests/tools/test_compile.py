"""End to end: compile the project's CNN into an artifact that ORT runs, then inspect, verify and run it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bitpass.backends.artifact import read_manifest, write_manifest
from bitpass.plugins import default_registry
from bitpass.tools import compile, run, verify
from bitpass.tools.cli import main


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, digits_files):
    out = tmp_path_factory.mktemp("compiled") / "artifact"
    code = main(["compile", str(digits_files / "model.onnx"), "--calib", str(digits_files / "calib.npz"),
                 "--eval", str(digits_files / "eval.npz"), "-o", str(out), "-q"])
    assert code == 0
    return out


def test_default_pipeline_meets_the_accuracy_and_size_bars(artifact):
    manifest = read_manifest(artifact)
    accuracy = manifest["metrics"]["quality"]["accuracy"]
    assert accuracy["fp32"] > 0.95
    assert accuracy["drop_points"] <= 1.0, accuracy
    search = manifest["records"]["quantization"].get("search", {})
    if search.get("chosen") == "fallback":  # int8 measured slower than fp32 on this CPU, beyond the tie allowed
        assert any("slower at batch" in d["why"] for r in search["rounds"] for d in r.get("decisions", []))
    else:
        assert manifest["metrics"]["size"]["weight_ratio"] <= 0.35
    # only what a device needs ships: no fp32 reference beside the model
    assert {p.name for p in artifact.iterdir()} == {"model.onnx", "manifest.json", "manifest.sha256", "report.html",
                                                    "session.json"}


def test_manifest_records_what_was_done_and_measured(artifact, digits_files):
    manifest = read_manifest(artifact)
    assert manifest["pipeline"].startswith("fold-constants,eliminate-dead-nodes,fuse,") and ",calibrate," in \
        manifest["pipeline"]
    assert manifest["input_model"]["sha256"] and manifest["versions"]["onnxruntime"]
    assert manifest["data"]["calibration"]["samples"] == 200
    assert manifest["data"]["evaluation"]["samples"] == 497
    assert [p["pass"].split("(")[0] for p in manifest["passes"]] == \
        ["fold-constants", "eliminate-dead-nodes", "fuse", "inline-functions", "fuse-transformer", "calibrate",
         "quantize"]
    layers = {r["id"]: r for r in manifest["layers"]}
    assert len(layers) == 5
    # int8 where it measured faster on this CPU; a layer the format search timed slower alone stays fp32, and
    # the manifest says so
    search = manifest["records"]["quantization"].get("search", {})
    changed = search.get("changed", {})
    # where int8 measures no faster than fp32, the search keeps fp32 (its fallback) and records it
    assert sum(r["stored"]["format"] == "QDQ int8" for r in layers.values()) >= 3 or search.get("chosen") == "fallback"
    assert all(r["bits"]["weight"] == 8 and r["stored"]["format"] == "QDQ int8" or changed.get(lid) == "fp32"
               for lid, r in layers.items())
    if search.get("chosen") != "fallback":
        assert manifest["summary"]["stored_bytes"] <= 0.35 * manifest["summary"]["fp32_bytes"]
    assert list(manifest["metrics"]["latency"])[0] == "batch_1" and len(manifest["metrics"]["latency"]) == 2
    for row in manifest["metrics"]["latency"].values():  # batch 1 and the larger batch (64 for this small model)
        assert row["fp32_ms"] > 0 and row["artifact_ms"] > 0
    assert "<table>" in (artifact / "report.html").read_text()


def test_the_artifact_is_valid_onnx_with_annotations(artifact):
    model = onnx.load(artifact / "model.onnx")
    onnx.checker.check_model(model)
    assert any(p.key == "bitpass.layer_id" for n in model.graph.node for p in n.metadata_props)


def test_verify_passes_on_a_fresh_artifact(artifact, digits_files, capsys):
    assert main(["verify", str(artifact), "--eval", str(digits_files / "eval.npz")]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_verify_fails_when_the_model_file_was_changed(artifact, digits_files, tmp_path, capsys):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(artifact, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    assert main(["verify", str(copy), "--eval", str(digits_files / "eval.npz")]) == 1
    assert "changed since it was compiled" in capsys.readouterr().out


def test_verify_fails_when_recorded_figures_are_missed(artifact, digits_files, tmp_path, capsys):
    import shutil

    copy = tmp_path / "optimistic"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["metrics"]["quality"]["accuracy"]["artifact"] = 1.01  # a claim no run can meet
    write_manifest(copy, manifest)  # consistently re-sealed: only the re-measurement can catch it
    assert main(["verify", str(copy), "--eval", str(digits_files / "eval.npz")]) == 1
    assert "accuracy" in capsys.readouterr().out


def test_run_writes_outputs_by_name(artifact, digits_files, tmp_path):
    out = tmp_path / "y.npz"
    assert main(["run", str(artifact), "--input", str(digits_files / "eval.npz"), "-o", str(out)]) == 0
    with np.load(out) as outputs:
        (logits,) = [outputs[k] for k in outputs.files]
    assert logits.shape == (497, 10)
    labels = np.load(digits_files / "eval.npz")["labels"]
    assert (logits.argmax(1) == labels).mean() > 0.95


def test_inspect_shows_every_layer(artifact, capsys):
    assert main(["inspect", str(artifact), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in records] == ["0", "3", "7", "11", "13"]


def test_compiling_twice_gives_identical_bytes_and_layer_records(digits_files, tmp_path):
    kwargs = dict(calibration=digits_files / "calib.npz", latency=False)
    first = compile(digits_files / "model.onnx", tmp_path / "a", **kwargs)
    second = compile(digits_files / "model.onnx", tmp_path / "b", **kwargs)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert first.manifest["layers"] == second.manifest["layers"]


def test_python_api_accepts_a_torch_module(trained_cnn, digits_split, tmp_path):
    import torch

    artifact = compile(trained_cnn, tmp_path / "t", example_inputs=(torch.zeros(1, 1, 8, 8),),
                       pipeline="optimize", evaluation={"input": digits_split.eval_x[:100]}, latency=False)
    fidelity = artifact.metrics["quality"]["fidelity"]
    assert fidelity["top1_agreement"] == 1.0 and fidelity["cosine"] > 0.99999
    outputs = run(tmp_path / "t", {"input": digits_split.eval_x[:3]})
    assert next(iter(outputs.values())).shape == (3, 10)
    assert all(c.ok for c in verify(tmp_path / "t"))


def test_force_replaces_an_earlier_artifact_atomically(digits_files, tmp_path):
    out = tmp_path / "o"
    compile(digits_files / "model.onnx", out, pipeline="optimize", latency=False)
    first_model = (out / "model.onnx").read_bytes()
    assert read_manifest(out)["pipeline"] == default_registry().pipeline("optimize").spec()
    compile(digits_files / "model.onnx", out, calibration=digits_files / "calib.npz", latency=False, force=True)
    replaced = read_manifest(out)
    assert replaced["pipeline"] == default_registry().pipeline("default").spec()  # the second one
    assert (out / "model.onnx").read_bytes() != first_model  # int8 now, and every file is the second compile's
    assert {layer["bits"]["weight"] for layer in replaced["layers"]} == {8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # nothing left beside it
    assert all(c.ok for c in verify(out))


def test_verify_finds_the_reference_by_its_sha256_and_refuses_another_model(artifact, digits_files, tmp_path,
                                                                             _mlp_proto, capsys):
    """The reference is the input file the artifact was compiled from (it is not in the artifact)."""
    assert all(c.ok for c in verify(artifact, digits_files / "eval.npz"))
    other = tmp_path / "other.onnx"
    onnx.save(_mlp_proto, other)  # the session's export of the trained MLP: another model with the same input
    assert main(["verify", str(artifact), "--eval", str(digits_files / "eval.npz"), "--reference", str(other)]) == 2
    assert "not the model this artifact was compiled from" in capsys.readouterr().err


def test_verify_without_a_findable_reference_says_how_to_give_one(digits_files, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path / "cache"))  # no cached copy from other tests
    model = tmp_path / "model.onnx"
    model.write_bytes((digits_files / "model.onnx").read_bytes())
    out = compile(model, tmp_path / "out", pipeline="optimize", evaluation=digits_files / "eval.npz", latency=False,
                  progress=False)
    model.unlink()  # the user moved their model away
    checks = {c.name: c for c in verify(out.path, digits_files / "eval.npz")}
    assert not checks["quality"].ok and "--reference" in checks["quality"].detail
    checks = {c.name: c for c in verify(out.path, digits_files / "eval.npz", reference=digits_files / "model.onnx")}
    assert checks["fidelity"].ok


def test_verify_catches_a_tampered_plan_even_when_the_manifest_is_resealed(artifact, tmp_path):
    """Emptying the manifest's layer list (and re-sealing it) cannot make a changed artifact pass."""
    import shutil

    copy = tmp_path / "resealed"
    shutil.copytree(artifact, copy)
    manifest = read_manifest(copy)
    manifest["layers"] = []
    write_manifest(copy, manifest)
    checks = {c.name: c for c in verify(copy)}
    assert not checks["plan"].ok and "missing from the manifest" in checks["plan"].detail
