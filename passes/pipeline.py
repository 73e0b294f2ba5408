"""Run a sequence of passes: check requires/produces first, instrument each pass, name failures."""

from __future__ import annotations

from collections.abc import Sequence

from bitpass.frontend import Model
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.infra import DATA_CALIBRATION, DATA_EVALUATION, Pass, PassContext, describe_facts
from bitpass.passes.instruments import Progress, Timing, Verifier

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


class Pipeline:
    """An ordered list of pass instances."""

    def __init__(self, passes: Sequence[Pass], name: str | None = None) -> None:
        self.passes = list(passes)
        self.name = name

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def check(self, ctx: PassContext) -> None:
        """Every ``requires`` must be supplied by the context or produced by an earlier pass."""
        available = ctx.facts()
        for index, pass_ in enumerate(self.passes):
            missing = set(pass_.requires) - available
            if missing:
                hints = [_DATA_HINTS[m] for m in sorted(missing) if m in _DATA_HINTS]
                others = sorted(m for m in missing if m not in _DATA_HINTS)
                if others:
                    hints.append(f"add a pass producing {describe_facts(others)} before it")
                raise UsageError(f"pipeline step {index + 1} {pass_.name!r} requires {describe_facts(missing)}, "
                                 f"which nothing before it provides: {'; '.join(hints)}")
            available |= set(pass_.produces)

    def run(self, model: Model, ctx: PassContext, *, verify: bool = True) -> Model:
        """Run every pass in order; returns the final model. Raises ``PipelineError`` naming the failing pass."""
        self.check(ctx)
        # Verification runs last, so a Timing instrument measures the pass alone.
        instruments = [Progress(), *ctx.instruments]
        if not any(isinstance(i, Timing) for i in instruments):
            instruments.append(Timing())
        if verify:
            instruments.append(Verifier())
        ran: list[str] = []
        for pass_ in self.passes:
            try:
                for instrument in instruments:
                    instrument.run_before_pass(pass_, model, ctx)
                result = pass_.run(model, ctx)
                if pass_.in_place and result.model is not model:
                    raise BitpassError("in-place pass returned a different model object")
                if result.modified:
                    ctx.analyses.invalidate(result.preserved, by=pass_.name)
                for instrument in instruments:
                    instrument.run_after_pass(pass_, result, ctx)
            except PipelineError:
                raise
            except Exception as err:  # a third-party pass may raise anything: name it
                raise PipelineError(pass_.spec(), ran, err) from err
            except SystemExit as err:  # nor may a pass end the compile (exit 0 and no artifact)
                raise PipelineError(pass_.spec(), ran, RuntimeError(f"the pass called sys.exit({err.code!r})")) \
                    from None
            model = result.model
            ran.append(pass_.spec())
        return model
