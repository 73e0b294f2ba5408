"""Run a sequence of passes: check requires/produces first, instrument each pass, name failures.

Contracts are checked both ways (as onnx-ir's pass infrastructure does): before the run, every
``requires`` must be supplied by the context or an earlier pass; after each pass, everything it
declares in ``produces`` must really exist (the analysis is cached, the annotation is on some node,
the data is in the context). A composite runs passes *inside* the caller's run with ``Sequential``:
they get the same instruments, verifier, invalidation and failure report as top-level passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bitpass.frontend import Model, annotation
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.infra import (
    ANALYSIS_FACT,
    ANNOTATION_FACT,
    DATA_CALIBRATION,
    DATA_EVALUATION,
    PRESERVE_ALL,
    Pass,
    PassContext,
    PassResult,
    describe_facts,
)
from bitpass.passes.instruments import PassInstrument, Progress, Timing, Verifier

_DATA_HINTS = {DATA_CALIBRATION: "give calibration data (--calib FILE)",
               DATA_EVALUATION: "give evaluation data (--eval FILE)"}


class PipelineError(BitpassError):
    """A pass failed; the message names it and the passes that ran before it."""

    def __init__(self, failed: str, ran: Sequence[str], cause: BaseException) -> None:
        self.failed, self.ran, self.cause = failed, list(ran), cause
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        before = ", ".join(ran) if ran else "none"
        super().__init__(f"pass {failed!r} failed: {text} (passes run before it: {before})")
        self.exit_code = getattr(cause, "exit_code", 1)


class ContractError(BitpassError):
    """A pass did not produce what it declares in ``produces``."""


def unmet_requirements(passes: Sequence[Pass], available: Iterable[str]) -> list[tuple[int, Pass, set[str]]]:
    """(index, pass, missing facts) for each pass whose ``requires`` neither ``available`` nor an earlier pass gives."""
    facts = set(available)
    unmet = []
    for index, pass_ in enumerate(passes):
        missing = set(pass_.requires) - facts
        if missing:
            unmet.append((index, pass_, missing))
        facts |= set(pass_.produces)
    return unmet


def missing_products(pass_: Pass, model: Model, ctx: PassContext) -> list[str]:
    """What ``pass_`` declares in ``produces`` that does not exist after it ran."""
    facts = ctx.facts()
    has_layers = bool(model.layers())
    missing = []
    for fact in sorted(pass_.produces):
        if fact.startswith(ANNOTATION_FACT):
            found = not has_layers or annotation.carried(model.ir, fact[len(ANNOTATION_FACT):])
        elif fact.startswith(ANALYSIS_FACT):
            found = fact[len(ANALYSIS_FACT):] in facts
        else:
            found = fact in facts
        if not found:
            missing.append(fact)
    return missing


class PassRunner:
    """One pipeline run in progress: its instruments, the passes run so far, the contract checks."""

    def __init__(self, instruments: Sequence[PassInstrument]) -> None:
        self.instruments = list(instruments)
        self.ran: list[str] = []

    @classmethod
    def for_context(cls, ctx: PassContext, *, verify: bool = True) -> PassRunner:
        # Verification runs last, so a Timing instrument measures the pass alone.
        instruments = [Progress(), *ctx.instruments]
        if not any(isinstance(i, Timing) for i in instruments):
            instruments.append(Timing())
        if verify:
            instruments.append(Verifier())
        return cls(instruments)

    def run_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> PassResult:
        """Run one pass with every instrument, invalidate what it did not preserve, check its products."""
        try:
            for instrument in self.instruments:
                instrument.run_before_pass(pass_, model, ctx)
            result = pass_.run(model, ctx)
            if pass_.in_place and result.model is not model:
                raise BitpassError("in-place pass returned a different model object")
            if result.modified:
                ctx.analyses.invalidate(result.preserved, by=pass_.name)
            missing = missing_products(pass_, result.model, ctx)
            if missing:
                raise ContractError(f"it declares that it produces {describe_facts(missing)}, but after it ran "
                                    f"{'that does' if len(missing) == 1 else 'those do'} not exist (a bug in the "
                                    f"pass: it must produce them, or not declare them)")
            for instrument in self.instruments:
                instrument.run_after_pass(pass_, result, ctx)
        except PipelineError:
            raise
        except Exception as err:  # a third-party pass may raise anything: name it
            raise PipelineError(pass_.spec(), self.ran, err) from err
        except SystemExit as err:  # nor may a pass end the compile (exit 0 and no artifact)
            raise PipelineError(pass_.spec(), self.ran, RuntimeError(f"the pass called sys.exit({err.code!r})")) \
                from None
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C and signals (the CLI's Terminated) unwind as they are
            raise
        except BaseException as err:  # a plugin raising a bare BaseException is still named
            raise PipelineError(pass_.spec(), self.ran, err) from err
        if not pass_.composite:
            self.ran.append(pass_.spec())
        return result


class Pipeline:
    """An ordered list of pass instances."""

    def __init__(self, passes: Sequence[Pass], name: str | None = None) -> None:
        self.passes = list(passes)
        self.name = name

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def check(self, ctx: PassContext) -> None:
        """Every ``requires`` must be supplied by the context or produced by an earlier pass."""
        for index, pass_, missing in unmet_requirements(self.passes, ctx.facts())[:1]:
            hints = [_DATA_HINTS[m] for m in sorted(missing) if m in _DATA_HINTS]
            others = sorted(m for m in missing if m not in _DATA_HINTS)
            if others:
                hints.append(f"add a pass producing {describe_facts(others)} before it")
            raise UsageError(f"pipeline step {index + 1} {pass_.name!r} requires {describe_facts(missing)}, "
                             f"which nothing before it provides: {'; '.join(hints)}")

    def run(self, model: Model, ctx: PassContext, *, verify: bool = True) -> Model:
        """Run every pass in order; returns the final model. Raises ``PipelineError`` naming the failing pass."""
        self.check(ctx)
        outer = ctx.runner
        ctx.runner = PassRunner.for_context(ctx, verify=verify)
        try:
            for pass_ in self.passes:
                model = ctx.runner.run_pass(pass_, model, ctx).model
        finally:
            ctx.runner = outer
        return model

    def as_pass(self) -> Sequential:
        """This pipeline as one pass, to run inside another pipeline's run."""
        return Sequential(self.passes)


class Sequential(Pass):
    """Passes run as one, inside the caller's pipeline run: its instruments, verifier and invalidation.

    A composite feature that is made of passes builds a ``Sequential`` and runs it on the context it
    was given; outside a pipeline run it runs its passes with the default instruments.
    """

    name = "sequential"
    composite = True

    def __init__(self, passes: Sequence[Pass]) -> None:
        super().__init__()
        self.passes = list(passes)
        produced: set[str] = set()
        requires: set[str] = set()
        for pass_ in self.passes:
            requires |= set(pass_.requires) - produced
            produced |= set(pass_.produces)
        self.requires = frozenset(requires)
        self.produces = frozenset(produced)
        self.in_place = all(p.in_place for p in self.passes)

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        unmet = unmet_requirements(self.passes, ctx.facts())
        if unmet:
            _, pass_, missing = unmet[0]
            raise UsageError(f"{pass_.name!r} requires {describe_facts(missing)}, which neither the context nor "
                             f"an earlier pass of this sequence provides")
        runner = ctx.runner if ctx.runner is not None else PassRunner.for_context(ctx)
        modified = False
        outer, ctx.runner = ctx.runner, runner
        try:
            for pass_ in self.passes:
                result = runner.run_pass(pass_, model, ctx)
                model, modified = result.model, modified or result.modified
        finally:
            ctx.runner = outer
        # every member has already invalidated what it did not preserve
        return PassResult(model, modified=modified, preserved=PRESERVE_ALL)


__all__: list[Any] = ["ContractError", "PassRunner", "Pipeline", "PipelineError", "Sequential",
                      "missing_products", "unmet_requirements"]
