"""Pass instruments (after TVM's ``ir/instrument.py``): hooks around every pass."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import onnx

from bitpass.frontend import annotation
from bitpass.frontend.errors import BitpassError

if TYPE_CHECKING:
    from bitpass.frontend import Model
    from bitpass.passes.infra import Pass, PassContext, PassResult


class PassInstrument:
    """Base instrument: override the hooks you need."""

    def run_before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:  # noqa: B027
        pass

    def run_after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:  # noqa: B027
        pass


class Timing(PassInstrument):
    """Wall time of each pass, in run order (the members of a composite, not the composite itself)."""

    def __init__(self) -> None:
        self.seconds: list[tuple[str, float]] = []
        self._starts: list[float] = []  # a stack: a composite's members start and end inside it

    def run_before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:
        self._starts.append(time.perf_counter())

    def run_after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        start = self._starts.pop()
        if not pass_.composite:
            self.seconds.append((pass_.spec(), time.perf_counter() - start))


class VerificationError(BitpassError):
    """A pass left the model invalid."""


class Verifier(PassInstrument):
    """After each pass that changed the model: onnx checker, shape inference, annotation schema."""

    def run_after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        if not result.modified or pass_.composite:  # a composite's members were verified one by one
            return
        verify(result.model)


def verify(model: Model) -> None:
    """Raise ``VerificationError`` if ``model`` is not a valid, consistently annotated ONNX model."""
    proto = model.to_proto()
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise VerificationError(f"invalid ONNX: {str(err).strip().splitlines()[0]}") from err
    problems = annotation.check_schema(model.ir)
    if problems:
        raise VerificationError(f"bad annotations: {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                                      if len(problems) > 1 else ""))


class Progress(PassInstrument):
    """Tells the context's progress callback which pass is running."""

    def run_before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:
        if not pass_.composite:
            ctx.progress(f"running {pass_.spec()}")
