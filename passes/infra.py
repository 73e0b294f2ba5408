"""Pass infrastructure: passes, their context and results, and cached analyses.

Modelled on onnx-ir's pass infra, TVM's ``PassContext`` and LLVM's new pass
manager: a pass declares what it ``requires`` and ``produces``; analyses are
computed on demand, cached, and invalidated by whatever a pass does not
``preserve``.
"""

from __future__ import annotations

import abc
import enum
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, overload

import pydantic

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.executors import SERIAL, Executor
from bitpass.passes.progress import SILENT, Reporter, as_reporter
from bitpass.passes.spec import parse_value

#: Facts the context supplies rather than a pass: ``data:calibration`` and ``data:evaluation``.
DATA_CALIBRATION = "data:calibration"
DATA_EVALUATION = "data:evaluation"
#: A fact ``annotation:<key>`` means some node carries the ``<key>`` annotation (or one under ``<key>.``).
ANNOTATION_FACT = "annotation:"
#: A fact ``analysis:<name>`` means the analysis cache holds ``<name>``; a bare name means the same.
ANALYSIS_FACT = "analysis:"

T = TypeVar("T")


class AnalysisKey(str, Generic[T]):
    """A typed name in the analysis cache: ``put`` checks the value is a ``type``, ``require`` returns a ``T``.

    It is a ``str``, so it also names the fact in a pass's ``requires`` / ``produces``.
    """

    type: type | tuple[type, ...]

    def __new__(cls, name: str, type_: type | tuple[type, ...] = object) -> AnalysisKey[T]:
        key = super().__new__(cls, name)
        key.type = type_
        return key

    def __repr__(self) -> str:
        kind = self.type.__name__ if isinstance(self.type, type) else "|".join(t.__name__ for t in self.type)
        return f"AnalysisKey({str(self)!r}, {kind})"


class PassConfig(pydantic.BaseModel):
    """Base of every pass's options: unknown keys are errors, values are validated."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class PreserveAll:
    """Marker: the pass changed nothing any analysis depends on."""

    def __repr__(self) -> str:
        return "PRESERVE_ALL"


PRESERVE_ALL = PreserveAll()


@dataclass
class PassResult:
    """What a pass returns: the model, whether it changed, and which analyses still hold."""

    model: Model
    modified: bool
    preserved: frozenset[str] | PreserveAll = frozenset()


class Analysis(abc.ABC):
    """A fact about a model computed on demand and cached until a pass invalidates it."""

    name: ClassVar[str]

    @abc.abstractmethod
    def compute(self, model: Model, ctx: PassContext) -> Any: ...


class AnalysisManager:
    """Cache of analysis results, keyed by name; passes invalidate what they do not preserve.

    Keys are ``AnalysisKey``s (typed: ``put`` checks the value, ``require`` is typed); plain strings
    still work for a third party's own results.
    """

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self._invalidated_by: dict[str, str] = {}

    def get(self, analysis: Analysis, model: Model, ctx: PassContext) -> Any:
        if analysis.name not in self._cache:
            self._cache[analysis.name] = analysis.compute(model, ctx)
            self._invalidated_by.pop(analysis.name, None)
        return self._cache[analysis.name]

    @overload
    def put(self, name: AnalysisKey[T], value: T) -> None: ...
    @overload
    def put(self, name: str, value: Any) -> None: ...

    def put(self, name: str, value: Any) -> None:
        """Record a result a pass computed itself (for example calibrated ranges)."""
        if isinstance(name, AnalysisKey) and not isinstance(value, name.type):
            raise BitpassError(f"analysis {str(name)!r} must be {_kind(name.type)}, got {type(value).__name__} "
                               f"(a bug in the pass that put it)")
        self._cache[name] = value
        self._invalidated_by.pop(name, None)

    @overload
    def require(self, name: AnalysisKey[T]) -> T: ...
    @overload
    def require(self, name: str) -> Any: ...

    def require(self, name: str) -> Any:
        """A result some earlier pass put; a clear error if it is missing or was invalidated."""
        if name in self._cache:
            return self._cache[name]
        culprit = self._invalidated_by.get(name)
        if culprit:
            raise BitpassError(f"{name} was invalidated by pass {culprit!r}, which changed the graph after it "
                               f"was computed: move the pass that produces {name} after {culprit!r}")
        raise BitpassError(f"no {name} has been computed: add the pass that produces it earlier in the pipeline")

    @overload
    def optional(self, name: AnalysisKey[T]) -> T | None: ...
    @overload
    def optional(self, name: str) -> Any: ...

    def optional(self, name: str) -> Any:
        """The cached result, or None when nothing holds it."""
        return self._cache.get(name)

    def cached(self, name: str) -> bool:
        return name in self._cache

    def names(self) -> frozenset[str]:
        """The names of every result held now."""
        return frozenset(self._cache)

    def invalidate(self, preserved: frozenset[str] | PreserveAll, by: str) -> None:
        if isinstance(preserved, PreserveAll):
            return
        for name in list(self._cache):
            if name not in preserved:
                del self._cache[name]
                self._invalidated_by[name] = by


@dataclass
class Target:
    """Where the artifact will run: a backend and a named target of that backend."""

    backend: str = "onnxruntime"
    name: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Everything a pass may read besides the model. Passed explicitly; there are no globals."""

    calibration: Dataset | None = None
    evaluation: Dataset | None = None
    target: Target = field(default_factory=Target)
    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    instruments: list[Any] = field(default_factory=list)
    seed: int = 0
    #: free-form facts passes record for the manifest (e.g. calibration method, layers skipped)
    records: dict[str, Any] = field(default_factory=dict)
    #: progress of long work: ``progress(message)``, and ``with progress.task(description, total) as t:
    #: ... t.advance()`` for loops (``passes/progress.py``); a plain callable is wrapped
    progress: Reporter = field(default=SILENT)
    #: where a pass's expensive independent loops run (``passes/executors.py``: serial, local:N, ray); results
    #: must not depend on it
    executor: Executor = field(default=SERIAL, repr=False, compare=False)

    #: the pipeline run in progress (set by ``Pipeline.run``): a composite pass runs passes through it
    #: (``Sequential``), so they get the run's instruments, verifier and invalidation
    runner: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.progress = as_reporter(self.progress)

    def facts(self) -> set[str]:
        """Facts the context supplies to the pipeline's requires-check: its data and the cached analyses."""
        facts = set()
        if self.calibration is not None:
            facts.add(DATA_CALIBRATION)
        if self.evaluation is not None:
            facts.add(DATA_EVALUATION)
        for name in self.analyses.names():
            facts |= {name, ANALYSIS_FACT + name}
        return facts


class Pass(abc.ABC):
    """A graph transformation or annotation, registered by its kebab-case ``name``.

    Subclasses set ``name``, optionally a ``Config`` (a ``PassConfig``), what they
    ``requires`` and ``produces``, and implement ``run``. The first line of the
    docstring is the summary ``bitpass passes`` shows.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    #: in-place passes return the model they were given; functional ones a new one
    in_place: ClassVar[bool] = True
    #: a pass made of passes (``Sequential``): instruments see its members, not it
    composite: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.config = make_config(self.Config, options, self.name)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def options(cls) -> dict[str, str]:
        """Option name -> 'type = default' for help texts."""
        out = {}
        for name, info in cls.Config.model_fields.items():
            kind = _type_name(info.annotation)
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            out[name] = f"{kind} = {default}"
        return out

    @abc.abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult: ...

    def spec(self) -> str:
        """This pass as a pipeline-spec item, showing options that differ from their defaults."""
        values = self.config.model_dump()
        shown = [f"{key}={_spec_value(values[key])}" for key, info in self.Config.model_fields.items()
                 if info.is_required() or values[key] != info.get_default(call_default_factory=True)]
        return f"{self.name}({','.join(shown)})" if shown else self.name

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


def _type_name(annotation: Any) -> str:
    """``int``, ``list[str]``, ``Literal['a', 'b']``, ``float | None``: as a user would write it."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _spec_value(value: Any) -> str:
    """``value`` written so that ``spec.parse_value`` reads it back equal."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_spec_value(v) for v in value) + "]"
    if isinstance(value, str):
        if parse_value(value) == value and not any(c in value for c in ",()[]='\" "):
            return value
        quote = "'" if '"' in value else '"'
        return f"{quote}{value}{quote}"
    if isinstance(value, enum.Enum):
        return _spec_value(value.value)
    return str(value)


def make_config(config: type[PassConfig], options: Mapping[str, Any], pass_name: str) -> PassConfig:
    """Validate options into ``config``; one-line errors that list the valid options."""
    try:
        return config(**dict(options))
    except pydantic.ValidationError as err:
        valid = ", ".join(config.model_fields) or "none"
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "options"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown option {where!r} (valid: {valid})")
            elif e["type"] == "missing":
                problems.append(f"missing required option {where!r}")
            else:
                problems.append(f"{where}={e.get('input')!r}: {e['msg']}")
        raise UsageError(f"pass {pass_name!r}: {'; '.join(problems)}") from None


def describe_facts(facts: Iterable[str]) -> str:
    return ", ".join(sorted(facts)) or "-"


def _kind(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
