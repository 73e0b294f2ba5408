"""ORT's transformer fusions as a pass, on a real (small, random-init) transformers BERT export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from bitpass.frontend import Model, load_model
from bitpass.passes.transformer_fusion import fuse_transformer
from bitpass.tools import model_families


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Model, dict[str, np.ndarray]]:
    built = model_families.build("bert", "fast")
    path = model_families.export(built, model_families.EXPORTS["torchscript-17"], tmp_path_factory.mktemp("bert"))
    return load_model(str(path)), {k: v[:4] for k, v in built.inputs_of(built.evaluation).items()}


def ops(model: Model) -> set[str]:
    return {node.op_type for node in model.graph.all_nodes()}


def run(model: Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_quantizing_configuration_leaves_skip_layer_norm_to_the_session(bert):
    """Offline SkipLayerNormalization made dynamic int8 slower (module docstring): without attention fusion
    (the quantizing pipelines) the residual Add + LayerNorm stay for ORT's session optimizer."""
    model, feeds = bert
    fused, record = fuse_transformer(model)
    assert "SkipLayerNormalization" not in ops(fused) and "SkipLayerNormalization" not in record["fused"]
    assert {layer.id for layer in fused.layers()} == {layer.id for layer in model.layers()}
    np.testing.assert_allclose(run(fused, feeds), run(model, feeds), rtol=1e-3, atol=1e-4)


def test_fp32_configuration_and_an_explicit_request_fuse_skip_layer_norm(bert):
    model, feeds = bert
    for options in ({"attention": True, "embed_layer_norm": True}, {"skip_layer_norm": True}):
        fused, record = fuse_transformer(model, **options)
        assert record["fused"].get("SkipLayerNormalization", 0) > 0, options
        np.testing.assert_allclose(run(fused, feeds), run(model, feeds), rtol=1e-3, atol=1e-4)


def test_the_input_model_is_untouched(bert):
    model, _ = bert
    before = model.to_bytes()
    fuse_transformer(model, skip_layer_norm=True)
    assert model.to_bytes() == before


def test_the_optimizer_never_copies_large_weights_they_are_shared_with_the_input(bert):
    """BERT-base's weights cost the optimizer ~2.5 GB of copies: without attention fusion it sees only stubs."""
    model, feeds = bert
    fused, _ = fuse_transformer(model)
    originals = model.ir.graph.initializers
    shared = [name for name, value in fused.ir.graph.initializers.items()
              if name in originals and value.const_value is originals[name].const_value]
    large = [name for name, value in originals.items() if value.const_value.size >= 1 << 14]
    assert large and set(large) <= set(shared)
    np.testing.assert_allclose(run(fused, feeds), run(model, feeds), rtol=1e-3, atol=1e-4)


def test_the_optimize_pipeline_times_orts_load_time_skip_layer_norm_and_records_its_choice(bert, tmp_path):
    """``optimize`` ends at this pass: ORT's own SkipLayerNormalization (made at load, which offline fusion would
    make impossible to turn off) is timed with and without, and the choice travels to the artifact."""
    import json

    from bitpass.tools import compile

    model, feeds = bert
    artifact = compile(model.clone(), tmp_path / "out", pipeline="optimize", calibration=feeds)  # timed on this CPU
    record = artifact.manifest["records"]["transformer_fusion"]
    assert "SkipLayerNormalization" not in record.get("fused", {})  # left to the session, where it can be timed
    choice = record["session_fusions"]
    assert choice["fused_at_load"] == ["SkipLayerNormFusion"]
    assert (choice["disabled_optimizers"] == ["SkipLayerNormFusion"]) == choice["without_them"]["faster"]
    session = json.loads((tmp_path / "out" / "session.json").read_text())
    assert session["disabled_optimizers"] == choice["disabled_optimizers"]


def test_with_attention_fusion_on_the_optimizer_still_sees_no_large_weight(bert):
    """The fp32 configuration (``optimize``: attention and embedding fusions on) also hands the optimizer weight
    stubs: a GPT-2-small-size model's weights cost it 2 GB of copies and the fused graph a second copy of each."""
    model, feeds = bert
    fused, record = fuse_transformer(model, attention=True, embed_layer_norm=True)
    originals = model.ir.graph.initializers
    large = [name for name, value in fused.ir.graph.initializers.items()
             if name in originals and value.const_value.size >= 1 << 14]
    assert large and all(fused.ir.graph.initializers[n].const_value is originals[n].const_value for n in large)
    assert record["fused"]
    np.testing.assert_allclose(run(fused, feeds), run(model, feeds), rtol=1e-3, atol=1e-4)


def test_a_fusion_that_needs_a_stubbed_weight_gets_the_whole_model(bert, monkeypatch):
    """When a fusion reads a weight the stubbed graph lacks (every initializer stubbed here), the optimizer runs
    again on the whole model: the same fusions as without stubs, never a silently skipped pass."""
    from bitpass.passes import transformer_fusion

    model, feeds = bert
    expected, _ = fuse_transformer(model, attention=True, embed_layer_norm=True)
    monkeypatch.setattr(transformer_fusion, "_STRIP_ELEMENTS", 1)
    fused, record = fuse_transformer(model, attention=True, embed_layer_norm=True)
    assert ops(fused) == ops(expected) and record["fused"]
    np.testing.assert_allclose(run(fused, feeds), run(expected, feeds), rtol=1e-5, atol=1e-6)
