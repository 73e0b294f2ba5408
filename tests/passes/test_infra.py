"""Specification of the pass infrastructure: options, specs, context and cached analyses.

Every pass here is a real ``Pass`` subclass that edits the onnx-ir graph of a
tiny model built with ``onnx.helper``; nothing is mocked.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pydantic
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import Model, from_proto
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.infra import (
    DATA_CALIBRATION,
    DATA_EVALUATION,
    PRESERVE_ALL,
    Analysis,
    AnalysisKey,
    AnalysisManager,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
    make_config,
)
from bitpass.passes.spec import parse_text
from bitpass.frontend.data import from_arrays


def tiny_model() -> Model:
    """x[1,4] -> MatMul(fc.weight[4,3]) -> Add(fc.bias) -> Relu -> y[1,3]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "fc.weight")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "fc.bias")
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"], name="fc_matmul"),
             helper.make_node("Add", ["h", "fc.bias"], ["h2"], name="fc_add"),
             helper.make_node("Relu", ["h2"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight, bias])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return from_proto(proto, name="tiny")


def run_model(model: Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


class ScaleConfig(PassConfig):
    factor: float = 2.0
    layers: list[str] = []
    mode: Literal["multiply", "divide"] = "multiply"
    tag: str = "scaled"
    verbose: bool = False


class ScaleWeights(Pass):
    """Multiply every layer's weight by a constant."""

    name = "scale-weights"
    Config = ScaleConfig
    produces = frozenset({"annotation:test.scaled"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        factor = self.config.factor if self.config.mode == "multiply" else 1 / self.config.factor
        for layer in model.layers():
            if self.config.layers and layer.id not in self.config.layers:
                continue
            layer.weight.const_value = ir.tensor(layer.weight_array * np.float32(factor), name=layer.weight.name)
        return PassResult(model, modified=True, preserved=frozenset())


class Required(PassConfig):
    bits: int
    scale: float = 1.0


class NeedsBits(Pass):
    """A pass with a required option."""

    name = "needs-bits"
    Config = Required

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(model, modified=False)


class CountNodes(Analysis):
    """Number of nodes; counts how often it was computed."""

    name = "node-count"

    def __init__(self) -> None:
        self.computed = 0

    def compute(self, model: Model, ctx: PassContext) -> int:
        self.computed += 1
        return len(model.graph)


# --- options -----------------------------------------------------------------

def test_options_are_validated_into_the_config():
    pass_ = ScaleWeights(factor=3, layers=["fc"], mode="divide")
    assert pass_.config.factor == 3.0 and pass_.config.layers == ["fc"] and pass_.config.mode == "divide"
    assert ScaleWeights().config.factor == 2.0


def test_unknown_option_is_a_usage_error_listing_the_valid_options():
    with pytest.raises(UsageError) as err:
        ScaleWeights(factr=3)
    message = str(err.value)
    assert "scale-weights" in message and "unknown option 'factr'" in message
    for option in ("factor", "layers", "mode", "tag", "verbose"):
        assert option in message


def test_wrong_type_is_a_usage_error_naming_the_option():
    with pytest.raises(UsageError) as err:
        ScaleWeights(factor="lots")
    assert "factor='lots'" in str(err.value) and "scale-weights" in str(err.value)
    with pytest.raises(UsageError, match="mode='halve'"):
        ScaleWeights(mode="halve")


def test_missing_required_option_is_a_usage_error():
    with pytest.raises(UsageError, match="pass 'needs-bits': missing required option 'bits'$"):
        NeedsBits()
    assert NeedsBits(bits=4).config.bits == 4


def test_usage_errors_exit_with_status_2():
    with pytest.raises(UsageError) as err:
        make_config(ScaleConfig, {"nope": 1}, "scale-weights")
    assert err.value.exit_code == 2


def test_config_is_frozen():
    pass_ = ScaleWeights()
    with pytest.raises(pydantic.ValidationError):
        pass_.config.factor = 5.0


def test_options_help_shows_type_and_default():
    options = NeedsBits.options()
    assert options["bits"] == "int = required"
    assert options["scale"] == "float = 1.0"
    assert ScaleWeights.options()["layers"] == "list[str] = []"
    assert ScaleWeights.options()["mode"] == "Literal['multiply', 'divide'] = 'multiply'"
    assert ScaleWeights.summary() == "Multiply every layer's weight by a constant."


# --- spec round trip -----------------------------------------------------------

def test_spec_shows_only_options_that_differ_from_defaults():
    assert ScaleWeights().spec() == "scale-weights"
    assert ScaleWeights(factor=0.5).spec() == "scale-weights(factor=0.5)"
    assert NeedsBits(bits=4).spec() == "needs-bits(bits=4)"
    assert repr(NeedsBits(bits=4)) == "<pass needs-bits(bits=4)>"


@pytest.mark.parametrize("options", [
    {},
    {"factor": 0.25},
    {"factor": 1e-5, "verbose": True},
    {"mode": "divide", "tag": "a,b(c)=d"},
    {"tag": "8"},           # a string that looks like a number
    {"tag": "true"},        # ... like a bool
    {"tag": "none"},        # ... like none
    {"tag": " padded "},
    {"tag": 'say "hi"'},
    {"layers": ["fc", "conv.1"]},
    {"layers": []},
])
def test_spec_round_trips_through_the_text_parser(options):
    original = ScaleWeights(**options)
    [(name, parsed)] = parse_text(original.spec())
    assert name == "scale-weights"
    assert ScaleWeights(**parsed).config == original.config


def test_spec_of_several_passes_round_trips():
    passes = [ScaleWeights(factor=3), NeedsBits(bits=8, scale=0.5), ScaleWeights(tag="x y")]
    text = ",".join(p.spec() for p in passes)
    rebuilt = [{"scale-weights": ScaleWeights, "needs-bits": NeedsBits}[n](**o) for n, o in parse_text(text)]
    assert [p.config for p in rebuilt] == [p.config for p in passes]


# --- the context -------------------------------------------------------------

def test_context_facts_come_from_the_data_it_carries():
    assert PassContext().facts() == set()
    data = from_arrays({"x": np.zeros((2, 4), np.float32)}, tiny_model().inputs)
    assert PassContext(calibration=data).facts() == {DATA_CALIBRATION}
    assert PassContext(calibration=data, evaluation=data).facts() == {DATA_CALIBRATION, DATA_EVALUATION}


def test_a_pass_really_changes_the_model():
    model, ctx = tiny_model(), PassContext()
    x = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)
    before = run_model(model, x)
    result = ScaleWeights(factor=3).run(model, ctx)
    assert result.modified and result.model is model
    np.testing.assert_allclose(run_model(result.model, x), 3 * before, rtol=1e-5, atol=1e-6)
    result = ScaleWeights(factor=3, mode="divide").run(model, ctx)
    np.testing.assert_allclose(run_model(result.model, x), before, rtol=1e-5, atol=1e-6)


# --- analyses ----------------------------------------------------------------

def test_analysis_is_computed_once_and_cached():
    model, ctx, count = tiny_model(), PassContext(), CountNodes()
    assert ctx.analyses.get(count, model, ctx) == 3
    assert ctx.analyses.get(count, model, ctx) == 3
    assert count.computed == 1 and ctx.analyses.cached("node-count")


def test_analyses_not_preserved_are_invalidated_and_recomputed():
    model, manager, count = tiny_model(), AnalysisManager(), CountNodes()
    ctx = PassContext(analyses=manager)
    manager.get(count, model, ctx)
    manager.put("ranges", {"x": (0.0, 1.0)})
    manager.invalidate(frozenset({"ranges"}), by="scale-weights")
    assert manager.cached("ranges") and not manager.cached("node-count")
    assert manager.require("ranges") == {"x": (0.0, 1.0)}
    manager.get(count, model, ctx)
    assert count.computed == 2


def test_preserve_all_keeps_every_analysis():
    manager = AnalysisManager()
    manager.put("ranges", 1)
    manager.put("layers", 2)
    manager.invalidate(PRESERVE_ALL, by="annotate")
    assert manager.cached("ranges") and manager.cached("layers")


def test_requiring_an_invalidated_result_names_the_pass_that_invalidated_it():
    manager = AnalysisManager()
    manager.put("activation-ranges", [1, 2])
    manager.invalidate(frozenset(), by="scale-weights")
    with pytest.raises(BitpassError) as err:
        manager.require("activation-ranges")
    assert "activation-ranges was invalidated by pass 'scale-weights'" in str(err.value)
    manager.put("activation-ranges", [3])  # recomputed: the error is gone
    assert manager.require("activation-ranges") == [3]


def test_requiring_a_result_nobody_computed_says_so():
    with pytest.raises(BitpassError, match="no activation-ranges has been computed"):
        AnalysisManager().require("activation-ranges")


def test_invalidation_only_records_what_was_cached():
    manager = AnalysisManager()
    manager.invalidate(frozenset(), by="scale-weights")
    with pytest.raises(BitpassError, match="no ranges has been computed"):
        manager.require("ranges")


def test_a_pass_edit_survives_serialization_as_valid_onnx_with_its_annotations():
    model = tiny_model()
    weight = model.layers()[0].weight_array.copy()
    layer_id = model.layers()[0].id
    ScaleWeights(factor=3).run(model, PassContext())
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    again = from_proto(proto, name="again")
    np.testing.assert_array_equal(again.layer(layer_id).weight_array, weight * np.float32(3))
    assert again.to_bytes() == model.to_bytes()


# --- typed analysis keys --------------------------------------------------------

RANGES: AnalysisKey[dict] = AnalysisKey("ranges", dict)


def test_a_typed_key_checks_what_is_put_and_is_the_name_of_its_fact():
    manager = AnalysisManager()
    with pytest.raises(BitpassError, match="analysis 'ranges' must be dict, got list"):
        manager.put(RANGES, [0.0, 1.0])
    assert not manager.cached(RANGES)
    manager.put(RANGES, {"x": (0.0, 1.0)})
    assert manager.require(RANGES) == {"x": (0.0, 1.0)} and manager.require("ranges") is manager.require(RANGES)
    assert RANGES == "ranges" and RANGES in frozenset({"ranges"}) and "ranges" in manager.names()
    assert manager.optional(AnalysisKey("other", int)) is None
    with pytest.raises(BitpassError, match="must be int or float, got str"):
        manager.put(AnalysisKey("scale", (int, float)), "2")


def test_cached_results_are_facts_the_requires_check_can_use():
    ctx = PassContext()
    ctx.analyses.put(RANGES, {})
    assert ctx.facts() == {"ranges", "analysis:ranges"}
