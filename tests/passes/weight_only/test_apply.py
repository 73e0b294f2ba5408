"""Weight-only recipes on a transformers LM: layouts, layer Hessians, and torch vs ONNX materialization."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bitpass.frontend import from_proto
from bitpass.passes.weight_only.apply import (WeightOnlyRecipe, apply_to_onnx, apply_to_torch, layerwise_widths,
                                              quantize_layers)
from bitpass.passes.weight_only.calibration import (is_conv1d, layer_hessians, linear_layer_ids,
                                                    output_channel_axis, set_weight_matrix, untie_output_embedding,
                                                    weight_matrix)
from bitpass.tools import decoders

WINDOWS = np.random.default_rng(0).integers(0, 256, (6, 17))


def test_conv1d_and_linear_weights_are_both_read_and_written_as_in_by_out():
    gpt2, llama = decoders.tiny_gpt2(), decoders.llama_small()
    c_fc, up = gpt2.get_submodule("transformer.h.0.mlp.c_fc"), llama.get_submodule("model.layers.0.mlp.up_proj")
    assert is_conv1d(c_fc) and not is_conv1d(up)
    assert output_channel_axis(c_fc) == 1 and output_channel_axis(up) == 0
    assert weight_matrix(c_fc).shape == (32, 128) and weight_matrix(up).shape == (64, up.out_features)
    x = torch.randn(3, 64)
    np.testing.assert_allclose(x.numpy() @ weight_matrix(up), up(x).detach().numpy(), atol=1e-5)
    new = np.ones((32, 128), np.float32)
    set_weight_matrix(c_fc, new)
    np.testing.assert_array_equal(weight_matrix(c_fc), new)
    with pytest.raises(ValueError, match="does not fit"):
        set_weight_matrix(up, np.ones((3, 3), np.float32))


def test_layer_hessians_are_the_gram_of_each_layers_own_inputs():
    lm = decoders.tiny_gpt2()
    ids = linear_layer_ids(lm)
    assert ids[0] == "transformer.h.0.attn.c_attn" and ids[-1] == "lm_head"
    hessians = layer_hessians(lm, ids, WINDOWS, batch=4)
    seen = []
    handle = lm.get_submodule("transformer.h.1.mlp.c_proj").register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].reshape(-1, 128).double().numpy()))
    with torch.no_grad():
        lm(input_ids=torch.from_numpy(WINDOWS))
    handle.remove()
    x = np.concatenate(seen)
    np.testing.assert_allclose(hessians["transformer.h.1.mlp.c_proj"], x.T @ x / len(x), rtol=1e-9)


def test_untying_gives_the_lm_head_its_own_copy():
    lm = decoders.tiny_gpt2()
    untie_output_embedding(lm)
    assert lm.lm_head.weight is not lm.transformer.wte.weight
    torch.testing.assert_close(lm.lm_head.weight, lm.transformer.wte.weight)


def test_a_fractional_width_needs_widths_to_mix():
    with pytest.raises(ValueError, match="widths="):
        WeightOnlyRecipe("gptq", 3.5)


def test_layerwise_widths_meet_a_parameter_weighted_average():
    lm = decoders.tiny_gpt2()
    ids = linear_layer_ids(lm)
    hessians = layer_hessians(lm, ids, WINDOWS)
    weights = {i: weight_matrix(lm.get_submodule(i)) for i in ids}
    chosen = layerwise_widths(weights, hessians, (2, 4), 3.0)
    average = sum(chosen[i] * weights[i].size for i in ids) / sum(w.size for w in weights.values())
    assert 2.5 < average <= 3.0 and set(chosen.values()) == {2, 4}


def test_the_same_codes_give_the_same_logits_in_torch_and_as_matmulnbits_in_onnx(tiny_gpt2_64):
    model, spec = tiny_gpt2_64  # the session's export; the codes are written into a copy of its torch module
    lm = copy.deepcopy(model.torch_module)
    ids = linear_layer_ids(lm)
    hessians = layer_hessians(lm, ids, WINDOWS)
    weights = {i: weight_matrix(lm.get_submodule(i)) for i in ids}
    layers = quantize_layers(weights, hessians, WeightOnlyRecipe("gptq", 3.0, 32, widths=(2, 4, 8), lowrank=2))
    proto = model.to_proto()
    apply_to_onnx(proto, layers, accuracy_level=0)
    apply_to_torch(lm, layers)
    session = ort.InferenceSession(from_proto(proto).to_bytes(), providers=["CPUExecutionProvider"])
    ids_in = WINDOWS[:2, :8]
    feeds = spec.feeds(ids_in)  # an empty cache
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = lm(input_ids=torch.from_numpy(ids_in)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert "MatMulNBits" in {n.op_type for n in proto.graph.node}
