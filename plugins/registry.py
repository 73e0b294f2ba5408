"""Registry of passes, backends and named pipelines, discovered from entry points.

Built-ins register through bitpass's own ``[project.entry-points]`` exactly as
a third-party package does; nothing registers by import side effect. Plugins
load only from installed entry points or from a path the user names.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.infra import Pass
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.spec import SpecItem, looks_like_file, parse_file, parse_text

PASSES, BACKENDS, PIPELINES = "bitpass.passes", "bitpass.backends", "bitpass.pipelines"
GROUPS = (PASSES, BACKENDS, PIPELINES)


class RegistryError(BitpassError):
    """Two packages claim one name, or a plugin could not be loaded."""


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    package: str


@dataclass(frozen=True)
class Broken:
    group: str
    name: str
    package: str
    error: str

    def describe(self) -> str:
        noun = {PASSES: "pass", BACKENDS: "backend", PIPELINES: "pipeline"}.get(self.group, self.group)
        return f"{noun} {self.name!r} from {self.package}: {self.error}"


def _one_line(err: BaseException, limit: int = 160) -> str:
    """An exception as one short line: its type and the first line of its message."""
    if isinstance(err, SystemExit):
        return f"called sys.exit({err.code!r})"[:limit]
    text = str(err).strip()
    line = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _name(name: str, limit: int = 60) -> str:
    """A user-given name quoted for a one-line message, shortened."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


#: close names suggested for an unknown one, at most
SUGGESTIONS = 3


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {g: {} for g in GROUPS})
    broken: list[Broken] = field(default_factory=list)
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    # --- discovery -------------------------------------------------------
    @classmethod
    def discover(cls, plugin_paths: Sequence[str | Path] = ()) -> Registry:
        registry = cls()
        for group in GROUPS:
            seen: set[tuple[str, str]] = set()
            for ep in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
                package = ep.dist.name if ep.dist is not None else "?"
                if (ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
                    continue
                seen.add((ep.name, ep.value))
                try:
                    obj = ep.load()
                except (Exception, SystemExit) as err:  # a broken plugin must not hide (or end) the others
                    registry.broken.append(Broken(group, ep.name, package, _one_line(err)))
                    continue
                registry.add(group, ep.name, obj, package)
        for path in plugin_paths:
            registry.load_path(Path(path))
        return registry

    def add(self, group: str, name: str, obj: Any, package: str) -> None:
        problem = _check(group, name, obj)
        if problem:
            self.broken.append(Broken(group, name, package, problem))
            return
        existing = self.entries[group].get(name)
        if existing is not None and existing.package != package:
            self.conflicts.setdefault((group, name), [existing.package]).append(package)
            return
        self.entries[group][name] = Entry(name, obj, package)

    def load_path(self, path: Path) -> None:
        """Import a plugin file (or package folder) the user named and register what it defines.

        The user asked for this file: if it cannot be imported (it raises, or calls ``sys.exit``),
        that is an error naming the file, not a silently missing plugin.
        """
        try:
            target = path / "__init__.py" if path.is_dir() else path
            usable = target.is_file() and target.suffix == ".py"
        except (OSError, ValueError):
            usable = False
        if not usable:
            raise UsageError(f"plugin path {_name(str(path), 120)}: not a .py file or a package folder")
        module_name = f"bitpass_user_plugin_{abs(hash(str(target.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, target,
                                                      submodule_search_locations=[str(path)] if path.is_dir() else None)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as err:
            sys.modules.pop(module_name, None)
            raise RegistryError(f"plugin {_name(str(path), 120)} failed to import: {_one_line(err)}") from None
        from bitpass.backends.base import Backend

        for _, obj in sorted(vars(module).items()):
            if not inspect.isclass(obj) or obj.__module__ != module_name or inspect.isabstract(obj):
                continue
            if issubclass(obj, Pass):
                self.add(PASSES, getattr(obj, "name", obj.__name__), obj, str(path))
            elif issubclass(obj, Backend):
                self.add(BACKENDS, getattr(obj, "name", obj.__name__), obj, str(path))

    # --- lookup ----------------------------------------------------------
    def _lookup(self, group: str, name: str, noun: str) -> Entry:
        if (group, name) in self.conflicts:
            packages = [self.entries[group][name].package, *self.conflicts[(group, name)][1:]] \
                if name in self.entries[group] else self.conflicts[(group, name)]
            listed = " and ".join(packages[:3]) + (f" (+{len(packages) - 3} more)" if len(packages) > 3 else "")
            raise RegistryError(f"{noun} {_name(name)} is registered by more than one package: {listed}; "
                                f"uninstall one of them")
        if name in self.entries[group]:
            return self.entries[group][name]
        for broken in self.broken:
            if broken.group == group and broken.name == name:
                raise RegistryError(f"{noun} {_name(name)} from package {broken.package} failed to load: "
                                    f"{broken.error}")
        if group == PASSES and name in self.entries[PIPELINES]:
            raise UsageError(f"{_name(name)} is a named pipeline, not a pass: give it alone as the pipeline, "
                             f"or spell out its passes (`bitpass pipelines` shows them)")
        raise UsageError(self.unknown_message(group, name, noun))

    def unknown_message(self, group: str, name: str, noun: str) -> str:
        """One short line however many plugins are installed: the closest names and where to find the rest."""
        close = difflib.get_close_matches(name, sorted(self.entries[group]), n=SUGGESTIONS)
        listing = {PASSES: "bitpass passes", PIPELINES: "bitpass pipelines"}.get(group, "bitpass passes")
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        failed = sum(1 for b in self.broken if b.group == group)
        broken = f" ({failed} plugin{'s' if failed != 1 else ''} failed to load: `{listing}` says why)" \
            if failed else ""
        return f"unknown {noun} {_name(name)}; {hint}`{listing}` lists them all{broken}"

    def pass_class(self, name: str) -> type[Pass]:
        return self._lookup(PASSES, name, "pass").obj

    def pass_entries(self) -> list[Entry]:
        return [self.entries[PASSES][k] for k in sorted(self.entries[PASSES])]

    def backend(self, name: str) -> Any:
        return self._lookup(BACKENDS, name, "backend").obj

    def pipeline_spec(self, name: str) -> str:
        return self._lookup(PIPELINES, name, "pipeline").obj

    def pipeline_entries(self) -> list[Entry]:
        return [self.entries[PIPELINES][k] for k in sorted(self.entries[PIPELINES])]

    # --- building --------------------------------------------------------
    def build(self, items: Iterable[SpecItem], name: str | None = None) -> Pipeline:
        return Pipeline([self._instantiate(n, options) for n, options in items], name=name)

    def _instantiate(self, name: str, options: dict[str, Any]) -> Pass:
        """A pass object; a plugin whose constructor raises (or exits) is named, not a traceback."""
        cls = self.pass_class(name)
        try:
            return cls(**options)
        except BitpassError:
            raise
        except (Exception, SystemExit) as err:
            package = self.entries[PASSES][name].package
            raise RegistryError(f"pass {_name(name)} from {package} failed to start: {_one_line(err)}") from None

    def pipeline(self, spec: str) -> Pipeline:
        """A named pipeline, a YAML/TOML file, or a one-line text spec."""
        broken_pipeline = any(b.group == PIPELINES and b.name == spec for b in self.broken)
        if spec in self.entries[PIPELINES] or (PIPELINES, spec) in self.conflicts or broken_pipeline:
            return self.build(parse_text(self.pipeline_spec(spec)), name=spec)
        if looks_like_file(spec):
            return self.build(parse_file(spec), name=Path(spec).name)
        return self.build(parse_text(spec))


def _check(group: str, name: str, obj: Any) -> str | None:
    """Why ``obj`` cannot be registered under ``name`` in ``group`` (None when it can)."""
    if group == PASSES:
        if not (inspect.isclass(obj) and issubclass(obj, Pass)):
            return f"entry point does not name a bitpass Pass subclass (got {obj!r})"
        if getattr(obj, "name", None) != name:
            return f"class {obj.__name__} has name {getattr(obj, 'name', None)!r}, not the entry point's {name!r}"
    elif group == BACKENDS:
        from bitpass.backends.base import Backend

        if not (inspect.isclass(obj) and issubclass(obj, Backend)):
            return f"entry point does not name a bitpass Backend subclass (got {obj!r})"
    elif group == PIPELINES and not isinstance(obj, str):
        return f"a pipeline entry point must name a spec string (got {type(obj).__name__})"
    return None


_DEFAULT: dict[tuple[str, ...], Registry] = {}


def default_registry(plugin_paths: Sequence[str | Path] = ()) -> Registry:
    """The registry for this process (discovered once per set of plugin paths)."""
    key = tuple(str(p) for p in plugin_paths)
    if key not in _DEFAULT:
        _DEFAULT[key] = Registry.discover(plugin_paths)
    return _DEFAULT[key]
