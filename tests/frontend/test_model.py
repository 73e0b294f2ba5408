"""``Model.clone``: an independent graph that shares the weights (no serialization round trip)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitpass.frontend import annotation, from_onnx
from bitpass.tools import model_families as mf


def test_a_clone_is_equal_independent_in_structure_and_shares_the_weight_tensors(tmp_path):
    built = mf.build("resnet18", "fast")
    model = from_onnx(mf.export(built, mf.EXPORTS["torchscript-17"], tmp_path))
    copy = model.clone()
    assert copy.to_bytes() == model.to_bytes()
    for name, value in copy.graph.initializers.items():
        assert value is not model.graph.initializers[name]
        assert value.const_value is model.graph.initializers[name].const_value  # shared, not copied
    # annotations, nodes and the opset are the copy's own
    layer = copy.layers()[0]
    annotation.set_weight_bits(layer.node, 4)
    assert annotation.weight_bits(model.layers()[0].node) is None
    copy.ir.opset_imports[""] = 21
    assert model.opset == 17
    # a weight is changed by giving its value a new tensor: the original keeps its own
    before = model.layers()[0].weight_array.copy()
    layer.weight.const_value = ir.tensor(np.zeros_like(before), name=layer.weight.name)
    np.testing.assert_array_equal(model.layers()[0].weight_array, before)
