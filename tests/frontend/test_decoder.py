"""KV-cache decoder export: one ONNX graph for prefill and decode that matches the torch model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bitpass.frontend import ModelLoadError, from_proto
from bitpass.frontend.decoder import DecoderSpec, export_decoder, spec_from_model
from bitpass.tools import decoders


@pytest.fixture(scope="module")
def gpt2():
    lm = decoders.tiny_gpt2(width=96)  # lm_head 256x96: above the exporter's constant-folding size limit
    lm.set_attn_implementation("sdpa")  # exported as eager, then restored (see the last test)
    model, spec = export_decoder(lm)
    return lm, model, spec


@pytest.fixture(scope="module")
def llama():
    lm = decoders.llama_small()
    model, spec = export_decoder(lm)
    return lm, model, spec


def session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])


def feeds(spec: DecoderSpec, ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    length = next(iter(past.values())).shape[2] + ids.shape[1]
    return {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], length), np.int64), **past}


def prefill_then_decode(lm, model, spec, batch: int, prompt: int) -> None:
    rng = np.random.default_rng(batch * 100 + prompt)
    ids = rng.integers(0, spec.vocab, (batch, prompt + 1))
    run = session(model)
    outputs = run.run(None, feeds(spec, ids[:, :-1], spec.empty_past(batch)))
    past = {name: outputs[1 + i] for i, name in enumerate(n for layer in range(spec.layers)
                                                             for n in spec.past_names(layer))}
    step = run.run(None, feeds(spec, ids[:, -1:], past))
    with torch.no_grad():
        reference = lm(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(outputs[0], reference[:, :-1], atol=1e-4)
    np.testing.assert_allclose(step[0][:, 0], reference[:, -1], atol=1e-4)
    assert step[1].shape == (batch, spec.kv_heads, prompt + 1, spec.head_dim)


@pytest.mark.parametrize(("batch", "prompt"), [(1, 1), (1, 6), (3, 4)])
def test_gpt2_prefill_then_one_token_decode_matches_torch_at_any_batch_and_length(gpt2, batch, prompt):
    prefill_then_decode(*gpt2, batch, prompt)


def test_llama_with_grouped_query_attention_caches_only_the_kv_heads(llama):
    lm, model, spec = llama
    assert (spec.kv_heads, spec.head_dim) == (2, 16)
    prefill_then_decode(lm, model, spec, 2, 5)


def test_batch_sequence_and_past_axes_are_dynamic_and_named(gpt2):
    _, model, spec = gpt2
    shapes = {t.name: t.shape for t in [*model.inputs, *model.outputs]}
    assert shapes["input_ids"] == ("batch", "sequence")
    assert shapes["attention_mask"] == ("batch", "total_sequence")
    assert shapes["past_key_values.1.value"] == ("batch", spec.kv_heads, "past_sequence", spec.head_dim)
    assert shapes["present.0.key"] == ("batch", spec.kv_heads, "total_sequence", spec.head_dim)
    assert shapes["logits"] == ("batch", "sequence", spec.vocab)


def test_a_tied_embedding_and_the_lm_head_get_their_own_module_path_ids(gpt2):
    lm, model, _ = gpt2
    ids = [layer.id for layer in model.layers()]
    assert lm.lm_head.weight is lm.transformer.wte.weight  # tied
    assert {"transformer.wte", "lm_head", "transformer.h.1.mlp.c_proj"} <= set(ids)
    assert not any("#" in i for i in ids)
    assert all(model.torch_module.get_submodule(i) is not None for i in ids)


@pytest.mark.parametrize("exported", ["gpt2", "llama"])
def test_every_linear_layer_of_the_lm_is_a_quantizable_matmul_layer(exported, request):
    from bitpass.passes.weight_only.calibration import linear_layer_ids

    lm, model, _ = request.getfixturevalue(exported)
    layers = {layer.id: layer for layer in model.layers()}
    assert set(linear_layer_ids(lm)) <= set(layers)
    assert all(layers[i].op_type == "MatMul" for i in linear_layer_ids(lm))


def test_conv1d_layers_export_as_matmul_with_their_in_out_weight(gpt2):
    lm, model, _ = gpt2
    layer = model.layer("transformer.h.0.attn.c_attn")
    np.testing.assert_array_equal(layer.weight_array, lm.transformer.h[0].attn.c_attn.weight.detach().numpy())


def test_the_spec_survives_saving_and_loading(gpt2, tmp_path):
    _, model, spec = gpt2
    path = tmp_path / "decoder.onnx"
    model.save(path)
    from bitpass.frontend import from_onnx

    assert spec_from_model(from_onnx(path)) == spec


def test_a_graph_without_decoder_metadata_is_refused_with_what_to_do(mlp_model):
    with pytest.raises(ModelLoadError, match="export_decoder"):
        spec_from_model(from_proto(mlp_model.to_proto()))


def test_export_leaves_the_attention_implementation_as_it_was(gpt2):
    lm, model, _ = gpt2
    assert lm.config._attn_implementation == "sdpa"
    assert "Softmax" in {node.op_type for node in model.graph}  # exported as eager attention


def _renamed(model, names: dict[str, str], drop_metadata: bool = True):
    """The graph with inputs/outputs renamed as another exporter names them (and no bitpass metadata)."""
    proto = model.to_proto()
    for node in proto.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in [*proto.graph.input, *proto.graph.output]:
        value.name = names.get(value.name, value.name)
    if drop_metadata:
        del proto.metadata_props[:]
    return from_proto(proto)


def test_a_transformers_exporter_graph_is_recognized_by_its_cache_names(gpt2):
    """transformers' own ONNX exporter names the cache past_key_values.layers.N.keys in, cache.layers.N.keys out."""
    from bitpass.frontend.decoder import detect_decoder

    _, model, spec = gpt2
    names = {}
    for layer in range(spec.layers):
        for part in ("key", "value"):
            names[f"past_key_values.{layer}.{part}"] = f"past_key_values.layers.{layer}.{part}s"
            names[f"present.{layer}.{part}"] = f"cache.layers.{layer}.{part}s"
    found = detect_decoder(_renamed(model, names))
    assert (found.layers, found.kv_heads, found.head_dim, found.vocab) == (spec.layers, spec.kv_heads, spec.head_dim,
                                                                           spec.vocab)
    assert found.past_names(1) == ("past_key_values.layers.1.keys", "past_key_values.layers.1.values")
    assert found.present_names(0) == ("cache.layers.0.keys", "cache.layers.0.values")


def test_a_detected_decoder_runs_prefill_then_decode_through_its_own_names(gpt2):
    from bitpass.backends.onnxruntime.generate import DecoderSession
    from bitpass.frontend.decoder import detect_decoder

    lm, model, spec = gpt2
    names = {f"present.{i}.{p}": f"cache.{i}.{p}" for i in range(spec.layers) for p in ("key", "value")}
    renamed = _renamed(model, names)
    session = DecoderSession.load(renamed, detect_decoder(renamed))
    ids = np.random.default_rng(3).integers(0, spec.vocab, (2, 6))
    _, past = session.prefill(ids[:, :5])
    logits, _ = session.forward(ids[:, 5:], past)
    with torch.no_grad():
        reference = lm(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits[:, 0], reference[:, -1], atol=1e-4)


def test_unpaired_cache_tensors_or_inputs_bitpass_cannot_feed_mean_not_a_decoder(gpt2):
    from bitpass.frontend.decoder import detect_decoder

    _, model, _ = gpt2
    assert detect_decoder(_renamed(model, {"present.1.value": "hidden_states"})) is None
    assert detect_decoder(_renamed(model, {"past_key_values.0.key": "encoder_states"})) is None


def test_spec_json_round_trips_and_a_damaged_record_is_refused(gpt2):
    _, _, spec = gpt2
    assert DecoderSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="pair up"):
        DecoderSpec.from_json({**spec.to_json(), "present": ["present.0.key"]})
    with pytest.raises(ValueError, match="non-negative"):
        DecoderSpec.from_json({**spec.to_json(), "layers": -1})


def test_logits_of_a_fixed_length_graph_without_a_cache_are_not_a_generating_decoder():
    """A causal LM wrapped to return logits and exported at one sequence length cannot take one token at a
    time: it is compiled as a plain model (its logits judged by agreement), not run as a decoder."""
    from bitpass.frontend import from_torch
    from bitpass.frontend.decoder import detect_decoder

    lm = decoders.tiny_gpt2()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits

    fixed = from_torch(Logits().eval(), (torch.randint(0, 256, (2, 12)),))
    assert fixed.inputs[0].shape[1] == 12
    assert detect_decoder(fixed) is None
