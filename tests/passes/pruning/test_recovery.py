"""``recover`` fine-tunes a pruned model by distillation (masks kept, record written), and pruned artifacts
compile and pass ``bitpass verify``."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.frontend.errors import UsageError
from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.pruning.recovery import GraphModule, Recover
from bitpass.plugins.registry import default_registry
from bitpass.tools import compile as compile_artifact
from bitpass.tools import verify


def run_spec(model, spec, ctx):
    return Pipeline(default_registry().pipeline(spec).passes).run(model, ctx)


def test_the_torch_interpreter_matches_onnxruntime(cnn_model, calib, outputs):
    import torch

    with torch.no_grad():
        got = GraphModule(cnn_model)(input=torch.from_numpy(calib.inputs["input"]))[0].numpy()
    np.testing.assert_allclose(got, outputs(cnn_model, calib), rtol=1e-4, atol=1e-4)


def test_recovery_after_structured_pruning(cnn_model, calib, evaluation, accuracy):
    ctx = PassContext(calibration=calib)
    dense = run_spec(cnn_model, "fold-constants,fuse", ctx)
    fp32 = accuracy(dense, evaluation)
    model = run_spec(dense, "prune-channels(ratio=0.3),recover", ctx)
    record = ctx.records["recovery"]
    assert record["distillation_loss_after"] < 0.2 * record["distillation_loss_before"]
    assert record["teacher"].startswith("the model before pruning")
    recovered = accuracy(model, evaluation)
    print(f"\nprune-channels(0.3) + recover: accuracy {fp32:.4f} -> {recovered:.4f}")
    assert recovered >= fp32 - 0.01  # the bar: at most 1 point lost with recovery


def test_recovery_keeps_the_unstructured_masks(cnn_model, calib):
    ctx = PassContext(calibration=calib)
    run_spec(cnn_model, "prune(method=wanda,sparsity=0.7)", ctx)
    zeros = {l.id: l.weight_array == 0 for l in cnn_model.layers()}
    run_spec(cnn_model, "recover(epochs=2)", ctx)
    record = ctx.records["recovery"]
    assert record["masked_weights"] == 5
    assert record["distillation_loss_after"] < record["distillation_loss_before"]
    for layer in cnn_model.layers():
        assert np.all(layer.weight_array[zeros[layer.id]] == 0)
        assert not np.array_equal(layer.weight_array == 0, np.ones_like(zeros[layer.id]))


def test_an_embedding_model_recovers_with_the_mse_loss(trained_transformer, outputs):
    """No labels: the distillation matches the teacher's raw embeddings (mse); the held-out cosine of a
    70 %-pruned transformer climbs back (measured 0.83 -> 0.99)."""
    import torch

    from bitpass.backends.measure import cosines
    from bitpass.frontend import from_arrays, from_torch

    module, split = trained_transformer
    base = from_torch(module, (torch.zeros(1, 1, 8, 8),))
    name = base.inputs[0].name
    calib = from_arrays({name: split.calib_x}, base.inputs)
    held_out = from_arrays({name: split.eval_x}, base.inputs)
    reference = outputs(base, held_out)

    def cosine(model) -> float:
        return float(np.mean(cosines(reference, outputs(model, held_out))))

    ctx = PassContext(calibration=calib, seed=0)
    pruned = run_spec(base, "fold-constants,fuse,prune(sparsity=0.7)", ctx)
    before = cosine(pruned)
    recovered = run_spec(pruned, "recover", ctx)
    assert ctx.records["recovery"]["loss"] == "mse"
    assert cosine(recovered) > before + 0.05 and cosine(recovered) > 0.97


def test_recovery_needs_a_teacher(cnn_model, calib):
    cnn_model.torch_module = None
    with pytest.raises(UsageError, match="teacher"):
        Recover().run(cnn_model, PassContext(calibration=calib))


def test_pruned_artifacts_compile_and_verify(digits_files, tmp_path):
    out = tmp_path / "artifact"
    artifact = compile_artifact(digits_files / "model.onnx", out,
                                pipeline="fold-constants,fuse,prune-channels(ratio=0.3),calibrate,quantize",
                                calibration=digits_files / "calib.npz", evaluation=digits_files / "eval.npz",
                                latency=False, tolerance="accuracy-drop=3")  # 30 % of channels, no recovery
    records = artifact.manifest["records"]
    assert records["prune-channels"]["params_after"] < records["prune-channels"]["params_before"]
    assert "recovery" not in records  # off by default
    checks = verify(out, digits_files / "eval.npz")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]

    dense_artifact = compile_artifact(digits_files / "model.onnx", tmp_path / "dense",
                                      pipeline="fold-constants,fuse,calibrate,quantize",
                                      calibration=digits_files / "calib.npz", latency=False)
    sparse = tmp_path / "sparse"
    artifact = compile_artifact(digits_files / "model.onnx", sparse,
                                pipeline="fold-constants,fuse,prune(method=wanda,sparsity=0.5,allocation=global),"
                                         "recover,calibrate,quantize",
                                calibration=digits_files / "calib.npz", evaluation=digits_files / "eval.npz",
                                latency=False)
    assert artifact.manifest["records"]["recovery"]["epochs"] == 20
    assert {r["id"]: r["sparsity"] for r in artifact.manifest["layers"]}["11"] > 0.4
    assert artifact.metrics["quality"]["accuracy"]["artifact"] > 0.95
    # unstructured zeros: no smaller tensors, but a smaller zip, which the manifest reports separately
    dense_size, sparse_size = (a.metrics["size"] for a in (dense_artifact, artifact))
    assert sparse_size["weight_bytes"] == dense_size["weight_bytes"]
    assert sparse_size["compressed_bytes"] < 0.85 * dense_size["compressed_bytes"]
    checks = verify(sparse, digits_files / "eval.npz")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_the_teacher_is_the_model_before_pruning_at_any_size(cnn_model, calib, outputs, monkeypatch):
    """``recover``'s teacher is a clone of the model before the first pruning pass, sharing the tensors pruning
    replaces (never writes into): it still computes the dense model's outputs after 70 % of the weights are zeroed,
    and past protobuf's 2 GiB (the limit lowered: every session then made from a file with external data) the same
    prune-and-recover runs, where the teacher used to be the model's serialized bytes."""
    from bitpass.frontend import model as model_module
    from bitpass.passes import execution
    from bitpass.passes.analyses import PRUNING_REFERENCE

    ctx = PassContext(calibration=calib)
    dense = run_spec(cnn_model, "fold-constants,fuse", ctx)
    before = outputs(dense, calib)
    monkeypatch.setattr(model_module, "SINGLE_PROTO_MAX_WEIGHT_BYTES", 1024)
    assert not dense.fits_one_proto()
    run_spec(dense, "prune(method=wanda,sparsity=0.7),recover(epochs=1)", ctx)
    teacher = ctx.analyses.require(PRUNING_REFERENCE)
    assert teacher is not dense
    np.testing.assert_allclose(execution.predict(teacher, calib), before, rtol=1e-5, atol=1e-5)
    assert not np.allclose(execution.predict(dense, calib), before, atol=1e-3)  # the student did change
    assert ctx.records["recovery"]["teacher"].startswith("the model before pruning")
