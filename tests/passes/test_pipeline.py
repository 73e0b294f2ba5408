"""Specification of ``Pipeline``: the requires-check, instruments, and errors that name the failing pass.

The passes are real ``Pass`` subclasses editing the onnx-ir graph of a tiny
model built with ``onnx.helper``; outputs are checked with ONNX Runtime.
"""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import Model, annotation, from_arrays, from_proto
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.infra import DATA_CALIBRATION, PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.instruments import PassInstrument, Timing, VerificationError, verify
from bitpass.passes.pipeline import ContractError, Pipeline, PipelineError, Sequential, missing_products


def tiny_model() -> Model:
    """x[1,4] -> MatMul(fc.weight[4,3]) -> Add(fc.bias) -> Relu -> y[1,3]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "fc.weight")
    bias = numpy_helper.from_array(np.full(3, 0.5, np.float32), "fc.bias")
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"], name="fc_matmul"),
             helper.make_node("Add", ["h", "fc.bias"], ["h2"], name="fc_add"),
             helper.make_node("Relu", ["h2"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight, bias])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return from_proto(proto, name="tiny")


X = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)


def run_model(model: Model) -> np.ndarray:
    session = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


# --- passes used as specimens ---------------------------------------------------------

class NegateConfig(PassConfig):
    times: int = 1


class AppendNeg(Pass):
    """Append Neg nodes after the graph output (the output keeps its name)."""

    name = "append-neg"
    Config = NegateConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        for _ in range(self.config.times):
            old = graph.outputs[0]
            node = ir.Node("", "Neg", inputs=[old], name=f"neg_{len(graph)}")
            new = node.outputs[0]
            new.shape, new.type = old.shape, old.type
            new.name, old.name = old.name, f"{old.name}_{len(graph)}"
            graph.append(node)
            graph.outputs[0] = new
        return PassResult(model, modified=True, preserved=frozenset())


class RecordRanges(Pass):
    """Put a result in the analysis cache, as calibration does."""

    name = "record-ranges"
    requires = frozenset({DATA_CALIBRATION})
    produces = frozenset({"analysis:ranges"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.analyses.put("ranges", {"x": (float(X.min()), float(X.max()))})
        return PassResult(model, modified=False)


class UseRanges(Pass):
    """Read the cached ranges, as quantization does."""

    name = "use-ranges"
    requires = frozenset({"analysis:ranges"})
    produces = frozenset({"annotation:bits.activation"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.analyses.require("ranges")
        for layer in model.layers():
            annotation.set_activation_bits(layer.node, 8)
        return PassResult(model, modified=True, preserved=PRESERVE_ALL)


class KeepRangesNeg(AppendNeg):
    """Append a Neg but declare that the ranges still hold."""

    name = "keep-ranges-neg"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        result = super().run(model, ctx)
        return PassResult(result.model, modified=True, preserved=frozenset({"ranges"}))


class Explode(Pass):
    """Raise inside run."""

    name = "explode"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise ValueError("weights are on fire\nsecond line")


class Misuse(Pass):
    """Raise a usage error inside run."""

    name = "misuse"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise UsageError("layer 'conv9' does not exist")


class BreakGraph(Pass):
    """Rename the Relu to an operator ONNX does not have."""

    name = "break-graph"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        next(n for n in model.graph if n.op_type == "Relu").op_type = "NoSuchOp"
        return PassResult(model, modified=True)


class SilentBreak(BreakGraph):
    """Break the graph but claim nothing changed."""

    name = "silent-break"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        super().run(model, ctx)
        return PassResult(model, modified=False)


class BadBits(Pass):
    """Annotate a width no backend has."""

    name = "bad-bits"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        annotation.set_weight_bits(model.layers()[0].node, 5)
        return PassResult(model, modified=True, preserved=PRESERVE_ALL)


class Copying(Pass):
    """A functional pass: returns a fresh copy with one more Neg."""

    name = "copying"
    in_place = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        copy = model.clone()
        AppendNeg().run(copy, ctx)
        return PassResult(copy, modified=True)


class ClaimsInPlace(Copying):
    """Returns a new model while declaring itself in-place."""

    name = "claims-in-place"
    in_place = True


class Sleep(Pass):
    """Sleep a little, so timing has something to measure."""

    name = "sleep"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        time.sleep(0.02)
        return PassResult(model, modified=False)


def calibration(model: Model):
    return from_arrays({"x": np.zeros((2, 4), np.float32)}, model.inputs)


# --- running ---------------------------------------------------------------------

def test_passes_run_in_order_and_really_change_the_model():
    model = tiny_model()
    before = run_model(model)
    out = Pipeline([AppendNeg(), AppendNeg(times=2)]).run(model, PassContext())
    assert [n.op_type for n in out.graph][-3:] == ["Neg", "Neg", "Neg"]
    np.testing.assert_allclose(run_model(out), -before)


def test_spec_is_the_comma_joined_pass_specs():
    assert Pipeline([AppendNeg(), AppendNeg(times=2), Sleep()]).spec() == "append-neg,append-neg(times=2),sleep"


def test_functional_pass_result_replaces_the_model():
    model = tiny_model()
    out = Pipeline([Copying()]).run(model, PassContext())
    assert out is not model
    assert len(out.graph) == 4 and len(model.graph) == 3


def test_in_place_pass_returning_another_model_is_an_error():
    with pytest.raises(PipelineError, match="'claims-in-place' failed: in-place pass returned a different model"):
        Pipeline([ClaimsInPlace()]).run(tiny_model(), PassContext())


# --- the requires check ---------------------------------------------------------------

def test_check_names_the_step_and_what_is_missing_with_the_calib_hint():
    pipeline = Pipeline([AppendNeg(), RecordRanges(), UseRanges()])
    with pytest.raises(UsageError) as err:
        pipeline.check(PassContext())
    message = str(err.value)
    assert "step 2 'record-ranges'" in message and "data:calibration" in message and "--calib" in message


def test_check_passes_when_the_context_supplies_the_data():
    model = tiny_model()
    Pipeline([RecordRanges(), UseRanges()]).check(PassContext(calibration=calibration(model)))


def test_a_requirement_produced_only_later_is_missing():
    model = tiny_model()
    pipeline = Pipeline([UseRanges(), RecordRanges()])
    with pytest.raises(UsageError) as err:
        pipeline.check(PassContext(calibration=calibration(model)))
    message = str(err.value)
    assert "step 1 'use-ranges'" in message and "analysis:ranges" in message
    assert "add a pass producing analysis:ranges before it" in message and "--calib" not in message


def test_the_check_runs_before_any_pass():
    model = tiny_model()
    with pytest.raises(UsageError, match="--calib"):
        Pipeline([AppendNeg(), RecordRanges()]).run(model, PassContext())
    assert len(model.graph) == 3  # append-neg never ran


# --- failures name the pass --------------------------------------------------------------

def test_a_failing_pass_is_named_with_the_passes_that_ran_before_it():
    model = tiny_model()
    pipeline = Pipeline([AppendNeg(), AppendNeg(times=2), Explode(), AppendNeg()])
    with pytest.raises(PipelineError) as err:
        pipeline.run(model, PassContext())
    message = str(err.value)
    assert message == ("pass 'explode' failed: weights are on fire "
                       "(passes run before it: append-neg, append-neg(times=2))")
    assert err.value.failed == "explode" and err.value.ran == ["append-neg", "append-neg(times=2)"]
    assert isinstance(err.value.cause, ValueError) and err.value.__cause__ is err.value.cause
    assert err.value.exit_code == 1


def test_failure_of_the_first_pass_says_none_ran():
    with pytest.raises(PipelineError, match=r"\(passes run before it: none\)"):
        Pipeline([Explode()]).run(tiny_model(), PassContext())


def test_a_usage_error_inside_a_pass_keeps_its_exit_code():
    with pytest.raises(PipelineError) as err:
        Pipeline([AppendNeg(), Misuse()]).run(tiny_model(), PassContext())
    assert "pass 'misuse' failed: layer 'conv9' does not exist" in str(err.value)
    assert err.value.exit_code == 2 and isinstance(err.value, BitpassError)


# --- analyses across passes ------------------------------------------------------------

def test_a_pass_that_does_not_preserve_a_result_invalidates_it_for_later_passes():
    model = tiny_model()
    pipeline = Pipeline([RecordRanges(), AppendNeg(), UseRanges()])
    with pytest.raises(PipelineError) as err:
        pipeline.run(model, PassContext(calibration=calibration(model)))
    message = str(err.value)
    assert "pass 'use-ranges' failed" in message
    assert "ranges was invalidated by pass 'append-neg'" in message
    assert "(passes run before it: record-ranges, append-neg)" in message


def test_preserved_results_survive_a_modifying_pass():
    model = tiny_model()
    ctx = PassContext(calibration=calibration(model))
    out = Pipeline([RecordRanges(), KeepRangesNeg(), UseRanges()]).run(model, ctx)
    assert ctx.analyses.cached("ranges")
    assert annotation.activation_bits(out.layers()[0].node) == 8


# --- instruments ------------------------------------------------------------------------

def test_verifier_catches_a_pass_that_breaks_the_graph():
    with pytest.raises(PipelineError) as err:
        Pipeline([AppendNeg(), BreakGraph(), AppendNeg()]).run(tiny_model(), PassContext())
    assert isinstance(err.value.cause, VerificationError)
    message = str(err.value)
    assert "pass 'break-graph' failed: invalid ONNX" in message and "NoSuchOp" in message
    assert "(passes run before it: append-neg)" in message


def test_a_large_model_is_verified_from_a_file_with_the_same_verdicts(monkeypatch):
    """Past ``VERIFY_IN_MEMORY_BYTES`` the checker and shape inference read the model by path, its weights as
    external data (in memory they held a 1.4 GB model five times): a broken graph is still refused."""
    from bitpass.passes import instruments

    monkeypatch.setattr(instruments, "VERIFY_IN_MEMORY_BYTES", 0)
    verify(Pipeline([AppendNeg()]).run(tiny_model(), PassContext()))
    with pytest.raises(PipelineError) as err:
        Pipeline([AppendNeg(), BreakGraph()]).run(tiny_model(), PassContext())
    assert isinstance(err.value.cause, VerificationError) and "NoSuchOp" in str(err.value)


def test_verifier_catches_bad_annotations():
    with pytest.raises(PipelineError, match="pass 'bad-bits' failed: bad annotations: .*bits.weight=5"):
        Pipeline([BadBits()]).run(tiny_model(), PassContext())


def test_verification_can_be_turned_off():
    out = Pipeline([BreakGraph(), BadBits()]).run(tiny_model(), PassContext(), verify=False)
    with pytest.raises(VerificationError, match="NoSuchOp"):
        verify(out)


def test_verifier_trusts_passes_that_report_no_change():
    out = Pipeline([SilentBreak()]).run(tiny_model(), PassContext())
    with pytest.raises(VerificationError):
        verify(out)


def test_timing_records_each_pass_in_run_order():
    timing = Timing()
    Pipeline([AppendNeg(), Sleep(), AppendNeg(times=2)]).run(tiny_model(), PassContext(instruments=[timing]))
    assert [name for name, _ in timing.seconds] == ["append-neg", "sleep", "append-neg(times=2)"]
    assert all(seconds >= 0 for _, seconds in timing.seconds)
    assert timing.seconds[1][1] >= 0.02


class Recorder(PassInstrument):
    def __init__(self) -> None:
        self.events: list[str] = []

    def run_before_pass(self, pass_, model, ctx):
        self.events.append(f"before {pass_.name} ({len(model.graph)} nodes)")

    def run_after_pass(self, pass_, result, ctx):
        self.events.append(f"after {pass_.name} modified={result.modified}")


def test_custom_instruments_see_every_pass():
    recorder = Recorder()
    Pipeline([AppendNeg(), Sleep()]).run(tiny_model(), PassContext(instruments=[recorder]))
    assert recorder.events == ["before append-neg (3 nodes)", "after append-neg modified=True",
                               "before sleep (4 nodes)", "after sleep modified=False"]


def test_progress_reports_each_pass():
    messages: list[str] = []
    Pipeline([AppendNeg(times=2), Sleep()]).run(tiny_model(), PassContext(progress=messages.append))
    assert messages == ["running append-neg(times=2)", "running sleep"]


# --- produces: checked after each pass ---------------------------------------------------

class ForgetsRanges(Pass):
    """Declares the ranges but never puts them."""

    name = "forgets-ranges"
    produces = frozenset({"analysis:ranges"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(model, modified=False)


class PutsThenDrops(RecordRanges):
    """Puts the ranges, then changes the graph without preserving them: they are gone when it returns."""

    name = "puts-then-drops"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        super().run(model, ctx)
        return AppendNeg().run(model, ctx)


class ClaimsBits(Pass):
    """Declares bits annotations it does not write."""

    name = "claims-bits"
    produces = frozenset({"annotation:bits"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(model, modified=False)


@pytest.mark.parametrize("pass_, missing", [(ForgetsRanges(), "analysis:ranges"),
                                            (PutsThenDrops(), "analysis:ranges"),
                                            (ClaimsBits(), "annotation:bits")])
def test_a_pass_that_does_not_produce_what_it_declares_is_named(pass_, missing):
    model = tiny_model()
    with pytest.raises(PipelineError) as err:
        Pipeline([AppendNeg(), pass_]).run(model, PassContext(calibration=calibration(model)))
    assert isinstance(err.value.cause, ContractError)
    assert str(err.value).startswith(f"pass '{pass_.name}' failed: it declares that it produces {missing}, but")
    assert "(passes run before it: append-neg)" in str(err.value)


def test_declared_products_that_exist_pass_the_check():
    model = tiny_model()
    ctx = PassContext(calibration=calibration(model))
    out = Pipeline([RecordRanges(), UseRanges()]).run(model, ctx)  # analysis:ranges, annotation:bits.activation
    assert missing_products(UseRanges(), out, ctx) == [] and missing_products(ClaimsBits(), out, ctx) == []
    assert missing_products(ClaimsBits(), tiny_model(), ctx) == ["annotation:bits"]


def test_a_model_without_layers_carries_every_layer_annotation_vacuously():
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "no-layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    Pipeline([ClaimsBits()]).run(from_proto(proto, name="no-layers"), PassContext())


def test_results_cached_before_the_run_satisfy_requires():
    ctx = PassContext()
    ctx.analyses.put("ranges", {"x": (0.0, 1.0)})
    Pipeline([UseRanges()]).run(tiny_model(), ctx)  # no calibration data needed: the ranges are there


# --- Sequential: passes run inside the caller's run ------------------------------------------

class NegTwice(Pass):
    """A composite made of passes: runs them as a Sequential on the context it was given."""

    name = "neg-twice"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return Sequential([AppendNeg(), AppendNeg()]).run(model, ctx)


def test_a_composite_runs_its_passes_under_the_callers_instruments():
    recorder, timing, messages = Recorder(), Timing(), []
    model = tiny_model()
    before = run_model(model)
    out = Pipeline([Sleep(), NegTwice()]).run(model, PassContext(instruments=[recorder, timing],
                                                                  progress=messages.append))
    np.testing.assert_allclose(run_model(out), before)  # two Negs
    assert recorder.events == ["before sleep (3 nodes)", "after sleep modified=False",
                               "before neg-twice (3 nodes)",
                               "before append-neg (3 nodes)", "after append-neg modified=True",
                               "before append-neg (4 nodes)", "after append-neg modified=True",
                               "after neg-twice modified=True"]
    assert [name for name, _ in timing.seconds] == ["sleep", "append-neg", "append-neg", "neg-twice"]
    assert messages == ["running sleep", "running neg-twice", "running append-neg", "running append-neg"]


def test_a_failure_inside_a_sequential_names_the_inner_pass_and_everything_before_it():
    with pytest.raises(PipelineError) as err:
        Pipeline([AppendNeg(times=2), Sequential([AppendNeg(), Explode()])]).run(tiny_model(), PassContext())
    assert str(err.value) == ("pass 'explode' failed: weights are on fire "
                              "(passes run before it: append-neg(times=2), append-neg)")


def test_passes_inside_a_sequential_are_verified_and_invalidate_results():
    with pytest.raises(PipelineError, match="pass 'break-graph' failed: invalid ONNX"):
        Pipeline([Sequential([AppendNeg(), BreakGraph()])]).run(tiny_model(), PassContext())
    model = tiny_model()
    with pytest.raises(PipelineError, match="ranges was invalidated by pass 'append-neg'"):
        Pipeline([RecordRanges(), Sequential([AppendNeg(), UseRanges()])]).run(
            model, PassContext(calibration=calibration(model)))


def test_a_sequential_declares_what_its_members_need_from_outside_and_produce():
    inner = Sequential([RecordRanges(), UseRanges()])
    assert inner.requires == {DATA_CALIBRATION} and inner.produces == {"analysis:ranges", "annotation:bits.activation"}
    assert inner.spec() == "record-ranges,use-ranges"
    with pytest.raises(UsageError, match="step 1 'sequential' requires data:calibration"):
        Pipeline([inner]).check(PassContext())
    with pytest.raises(UsageError, match="'use-ranges' requires analysis:ranges"):
        Sequential([UseRanges()]).run(tiny_model(), PassContext())


def test_a_sequential_outside_a_pipeline_verifies_its_passes():
    with pytest.raises(PipelineError, match="pass 'break-graph' failed: invalid ONNX"):
        Sequential([BreakGraph()]).run(tiny_model(), PassContext())
    assert Pipeline([AppendNeg()]).as_pass().passes[0].name == "append-neg"


class _Exits(Pass):
    """Calls sys.exit, as a careless plugin might."""

    name = "exits"

    def run(self, model, ctx):
        raise SystemExit(0)


def test_a_pass_calling_sys_exit_is_a_pipeline_error_not_an_exit() -> None:
    """sys.exit(0) inside a pass once ended the compile with exit 0 and no artifact."""
    with pytest.raises(PipelineError, match=r"pass 'exits' failed: the pass called sys.exit\(0\)"):
        Pipeline([_Exits()]).run(tiny_model(), PassContext())


def test_timing_records_seconds_and_peak_memory_of_every_pass_for_the_manifest(cnn_model):
    from bitpass.passes.cleanup import EliminateDeadNodes

    class Allocates(Pass):
        """Holds 200 MB for a moment."""

        name = "allocates"

        def run(self, model, ctx):
            block = np.ones(50_000_000, dtype=np.float32)
            block[::4096] = 2.0
            time.sleep(0.3)
            del block
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)

    timing = Timing()
    ctx = PassContext(instruments=[timing])
    Pipeline([EliminateDeadNodes(), Allocates()]).run(cnn_model, ctx, verify=False)
    rows = ctx.records["resources"]["passes"]
    assert [r["pass"] for r in rows] == ["eliminate-dead-nodes", "allocates"]
    assert all(r["seconds"] >= 0 for r in rows)
    assert rows[1]["peak_rss_mb"] >= rows[0]["peak_rss_mb"] + 150  # the 200 MB it held were seen
    assert ctx.records["resources"]["peak_rss_mb"] >= rows[1]["peak_rss_mb"]


def test_timing_records_cpu_seconds_apart_from_wall_seconds(cnn_model):
    """On a shared machine wall time includes waiting; the CPU seconds of a pass count only its own work."""

    class Sleeps(Pass):
        name = "sleeps"

        def run(self, model, ctx):
            time.sleep(0.4)
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)

    class Spins(Pass):
        name = "spins"

        def run(self, model, ctx):
            start = time.process_time()
            while time.process_time() - start < 0.3:
                pass
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)

    timing = Timing()
    ctx = PassContext(instruments=[timing])
    Pipeline([Sleeps(), Spins()]).run(cnn_model, ctx, verify=False)
    sleeps, spins = ctx.records["resources"]["passes"]
    assert sleeps["seconds"] >= 0.4 and sleeps["cpu_seconds"] < 0.2
    assert spins["cpu_seconds"] >= 0.29
