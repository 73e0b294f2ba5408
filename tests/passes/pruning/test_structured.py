"""``prune-channels`` removes channels from the graph: fewer parameters, same function as zeroing those
channels, residual Adds pruned together, Concat offsets mapped, what cannot be traced refused with a reason,
and a faster model in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bitpass.backends import measure
from bitpass.backends.onnxruntime.runner import OrtRunner
from bitpass.frontend import from_arrays, from_proto
from bitpass.frontend.errors import UsageError
from bitpass.passes.infra import PassContext
from bitpass.passes.instruments import verify
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.pruning.common import output_axis
from bitpass.passes.pruning.structured import PruneChannels
from bitpass.plugins.registry import default_registry


def run_spec(model, spec, ctx):
    return Pipeline(default_registry().pipeline(spec).passes).run(model, ctx)


def zeroed(model, removed):
    """A copy of ``model`` whose removed output channels are zero in the producers' weight and bias."""
    from bitpass.passes.pruning.common import set_constant

    copy = model.clone()
    for layer in copy.layers():
        if layer.id not in removed:
            continue
        axis = output_axis(layer)
        w = layer.weight_array.copy()
        index = [slice(None)] * w.ndim
        index[axis] = removed[layer.id]
        w[tuple(index)] = 0
        set_constant(layer.weight, w)
        if len(layer.node.inputs) > 2 and layer.node.inputs[2] is not None:
            b = layer.node.inputs[2].const_value.numpy().copy()
            b[..., removed[layer.id]] = 0
            set_constant(layer.node.inputs[2], b)
    return copy


def test_thirty_percent_of_the_cnn_channels(cnn_model, calib, evaluation, outputs, accuracy):
    ctx = PassContext(calibration=calib)
    model = run_spec(cnn_model, "fold-constants,fuse", ctx)
    dense = model.clone()
    before = accuracy(dense, evaluation)
    run_spec(model, "prune-channels(ratio=0.3)", ctx)
    record = ctx.records["prune-channels"]
    assert record["params_after"] < 0.7 * record["params_before"]
    assert sum(l.params for l in model.layers()) == record["params_after"]
    assert record["channels"] == {"3": "32 -> 24", "7": "64 -> 48", "11": "64 -> 48"}
    assert "graph input" in record["refused"]["0"]  # keep_first: the first conv's 16 filters stay
    assert "graph output" in record["refused"]["13"]
    assert 0.2 <= record["channel_fraction_removed"] <= 0.35
    assert model.torch_module is None and "detached" in record["torch_module"]
    verify(model)  # checker, shape inference, annotations
    strict = onnx.shape_inference.infer_shapes(model.to_proto(), check_type=True, strict_mode=True)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in strict.graph.value_info}
    assert any(s == ["batch", 48, 4, 4] or s[1:] == [48, 4, 4] for s in shapes.values())
    out = outputs(model, evaluation)
    assert out.shape == (len(evaluation), 10) and np.isfinite(out).all()
    # the same function as zeroing those channels (no BN left after fuse): slicing is exact
    removed = {k: np.array(v) for k, v in record["removed"].items()}
    np.testing.assert_allclose(out, outputs(zeroed(dense, removed), evaluation), rtol=1e-4, atol=1e-4)
    after = accuracy(model, evaluation)
    print(f"\nCNN prune-channels(ratio=0.3): params {record['params_before']} -> {record['params_after']}, "
          f"accuracy {before:.4f} -> {after:.4f}")
    assert before > 0.95 and 0.0 <= after <= 1.0  # the loss is reported; recovery wins it back (test_recovery)


def test_unfused_batchnorm_is_sliced_with_its_conv(cnn_model, calib, outputs):
    ctx = PassContext(calibration=calib)
    PruneChannels(ratio=0.3, method="bn").run(cnn_model, ctx)
    bns = [n for n in cnn_model.graph if n.op_type == "BatchNormalization"]
    assert [n.inputs[1].const_value.shape[0] for n in bns] == [16, 24, 48]  # the first conv is kept
    assert ctx.records["prune-channels"]["bn_fallback_l2"] == ["11"]  # the Gemm has no BatchNorm after it
    verify(cnn_model)
    assert np.isfinite(outputs(cnn_model, calib)).all()


def test_taylor_needs_the_torch_module(cnn_model, calib, outputs):
    ctx = PassContext(calibration=calib)
    PruneChannels(method="taylor", round_to=1).run(cnn_model, ctx)
    assert ctx.records["prune-channels"]["channels"]["3"] == "32 -> 22"
    assert np.isfinite(outputs(cnn_model, calib)).all()
    cnn_model.torch_module = None
    with pytest.raises(UsageError, match="l1\\|l2\\|bn"):
        PruneChannels(method="taylor").run(cnn_model, ctx)


def test_the_mlp(mlp_model, calib_arrays, outputs):
    calib = from_arrays(calib_arrays, mlp_model.inputs)
    dense = mlp_model.clone()
    ctx = PassContext(calibration=calib)
    PruneChannels(ratio=0.5).run(mlp_model, ctx)
    record = ctx.records["prune-channels"]
    assert record["params_after"] < 0.5 * record["params_before"]
    removed = {k: np.array(v) for k, v in record["removed"].items()}
    np.testing.assert_allclose(outputs(mlp_model, calib), outputs(zeroed(dense, removed), calib), rtol=1e-4,
                               atol=1e-4)


# --- residual Add and Concat, on a graph written by hand -------------------------------------------------
def _conv(name, cin, cout, rng, inputs, output):
    w = helper.make_tensor(f"{name}.weight", TensorProto.FLOAT, [cout, cin, 3, 3],
                           rng.standard_normal((cout, cin, 3, 3)).astype(np.float32).ravel() * 0.3)
    b = helper.make_tensor(f"{name}.bias", TensorProto.FLOAT, [cout], rng.standard_normal(cout).astype(np.float32))
    node = helper.make_node("Conv", [inputs, f"{name}.weight", f"{name}.bias"], [output], name=name,
                            pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    return node, [w, b]


def residual_concat_model(residual_from_input: bool = False):
    """x(4ch) -> a(8) -> relu -> b(8) ; c(8) from x ; add(b, c) -> relu -> concat(., d(8) from x) -> e(4)
    -> GlobalAveragePool -> Flatten -> fc(4 -> 3) -> y. With ``residual_from_input``, b is added to x itself."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    width = 4 if residual_from_input else 8
    for name, cin, cout, src, dst in [("a", 4, 8, "x", "a_out"), ("b", 8, width, "a_relu", "b_out"),
                                      ("c", 4, 8, "x", "c_out"), ("d", 4, 8, "x", "d_out"),
                                      ("e", width + 8, 4, "cat", "e_out")]:
        node, weights = _conv(name, cin, cout, rng, src, dst)
        nodes.append(node)
        inits += weights
    nodes += [helper.make_node("Relu", ["a_out"], ["a_relu"], name="relu_a"),
              helper.make_node("Add", ["b_out", "x" if residual_from_input else "c_out"], ["sum"], name="residual"),
              helper.make_node("Relu", ["sum"], ["sum_relu"], name="relu_sum"),
              helper.make_node("Concat", ["sum_relu", "d_out"], ["cat"], name="cat", axis=1),
              helper.make_node("GlobalAveragePool", ["e_out"], ["pooled"], name="gap"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    inits += [helper.make_tensor("fc.weight", TensorProto.FLOAT, [3, 4], rng.standard_normal(12).astype(np.float32)),
              helper.make_tensor("fc.bias", TensorProto.FLOAT, [3], np.zeros(3, np.float32))]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    order = ["a", "relu_a", "b", "c", "residual", "relu_sum", "d", "cat", "e", "gap", "flatten", "fc"]
    graph.node.sort(key=lambda n: order.index(n.name))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    proto = onnx.shape_inference.infer_shapes(proto)
    model = from_proto(proto, name="residual", kind="onnx")
    data = from_arrays({"x": np.random.default_rng(1).standard_normal((16, 4, 6, 6)).astype(np.float32)},
                       model.inputs)
    return model, data


def test_residual_add_prunes_both_sides_alike_and_concat_maps_offsets(outputs):
    model, data = residual_concat_model()
    dense = model.clone()
    ctx = PassContext()
    PruneChannels(ratio=0.5, round_to=1, keep_first=False).run(model, ctx)
    record = ctx.records["prune-channels"]
    assert set(record["channels"]) == {"a", "b", "c", "d", "e"}
    assert record["groups"] == [["b", "c"]]
    assert record["removed"]["b"] == record["removed"]["c"]
    assert "graph output" in record["refused"]["fc"]
    e = model.layer("e")
    assert e.weight_shape == (2, 8, 3, 3)  # 4 of b+c and 4 of d stay
    verify(model)
    np.testing.assert_allclose(outputs(model, data), outputs(zeroed(dense, {k: np.array(v) for k, v in
                                                                           record["removed"].items()}), data),
                               rtol=1e-4, atol=1e-4)


def test_a_residual_from_something_unprunable_is_refused_with_the_reason(outputs):
    model, data = residual_concat_model(residual_from_input=True)
    ctx = PassContext()
    PruneChannels(ratio=0.5, keep_first=False).run(model, ctx)
    record = ctx.records["prune-channels"]
    assert "b" not in record["channels"] and "residual" in record["refused"]["b"]
    assert {"a", "d", "e"} <= set(record["channels"])
    verify(model)
    assert np.isfinite(outputs(model, data)).all()


def test_pruned_cnn_keeps_channel_counts_on_onnxruntimes_blocks_and_loses_macs(cnn_model, calib):
    """What makes the pruned CNN faster in ONNX Runtime (timed by ``bench_pruning``, not here): fewer MACs, and
    kept channel counts that stay multiples of 8 (ORT's blocked convolutions; 11/22/45 channels ran slower)."""
    from bitpass.passes.allocation.problem import layer_macs

    ctx = PassContext(calibration=calib)
    dense = run_spec(cnn_model, "fold-constants,fuse", ctx).clone()
    pruned = run_spec(dense.clone(), "prune-channels(ratio=0.3)", PassContext(calibration=calib))
    channels = {l.id: l.weight_shape[output_axis(l)] for l in pruned.layers()}
    before = {l.id: l.weight_shape[output_axis(l)] for l in dense.layers()}
    changed = {lid for lid in channels if channels[lid] != before[lid]}
    assert changed and all(channels[lid] % 8 == 0 for lid in changed)
    macs_before, macs_after = (sum(layer_macs(m, m.layers()).values()) for m in (dense, pruned))
    assert macs_after < 0.75 * macs_before
    runner = OrtRunner.from_bytes(pruned.to_bytes())
    assert runner.run(measure.batch_of(calib, 64))[0].shape == (64, 10)
