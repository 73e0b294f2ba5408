"""Specification of the plugin registry: discovery from entry points and files, broken plugins, conflicts.

Throwaway plugin distributions are written into a temporary site folder (a
``*.dist-info`` with METADATA and entry_points.txt, plus a module) that is put
on ``sys.path`` for one test and taken off again afterwards.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import Model, annotation, from_proto
from bitpass.frontend.errors import UsageError
from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline
from bitpass.plugins import Registry, RegistryError
from bitpass.plugins.registry import BACKENDS, PASSES, PIPELINES, Broken

GOOD_PASS = '''
from bitpass.passes.infra import Pass, PassConfig, PassResult

class Options(PassConfig):
    level: int = 1

class {cls}(Pass):
    """{summary}"""
    name = "{name}"
    Config = Options

    def run(self, model, ctx):
        return PassResult(model, modified=False)
'''

MakeDist = Callable[..., Path]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[MakeDist]:
    """``make(dist, entry_points, modules)`` writes an installed distribution that discovery will find."""
    folder = tmp_path / "site"
    folder.mkdir()
    modules_before = set(sys.modules)

    def make(dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> Path:
        info = folder / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{name} = {value}" for name, value in eps.items())
            lines.append("")
        (info / "entry_points.txt").write_text("\n".join(lines))
        for module, source in modules.items():
            (folder / f"{module}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        return folder

    sys.path.insert(0, str(folder))
    try:
        yield make
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - modules_before:
            if str(folder) in str(getattr(sys.modules[name], "__file__", "") or ""):
                del sys.modules[name]
        importlib.invalidate_caches()


def good_pass(name: str, cls: str = "ThePass", summary: str = "A pass from a plugin.") -> str:
    return GOOD_PASS.format(name=name, cls=cls, summary=summary)


def tiny_model() -> Model:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "fc.weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="fc")], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


# --- entry points ---------------------------------------------------------------------------

def test_built_in_passes_and_pipelines_register_through_bitpass_entry_points():
    registry = Registry.discover()
    built_in = {e.name for e in registry.pass_entries() if e.package == "bitpass"}
    built_in |= {b.name for b in registry.broken if b.package == "bitpass" and b.group == PASSES}
    assert {"fold-constants", "fuse", "calibrate", "quantize"} <= built_in
    assert {e.name for e in registry.pipeline_entries()} >= {"default", "optimize"}
    assert all(e.package == "bitpass" for e in registry.pipeline_entries())


def test_a_plugin_pass_is_listed_with_its_package(site):
    site("acme-passes", {PASSES: {"acme-pass": "acme_mod:ThePass"}},
         {"acme_mod": good_pass("acme-pass", summary="Do the acme thing.")})
    registry = Registry.discover()
    entry = next(e for e in registry.pass_entries() if e.name == "acme-pass")
    assert entry.package == "acme-passes" and entry.obj.summary() == "Do the acme thing."
    assert registry.pass_class("acme-pass")(level=3).config.level == 3
    assert [e.name for e in registry.pass_entries()] == sorted(e.name for e in registry.pass_entries())


def test_a_plugin_that_fails_to_import_is_reported_by_name_and_others_still_list(site):
    site("broken-plugin", {PASSES: {"broken-pass": "broken_mod:ThePass"}},
         {"broken_mod": "import a_dependency_that_is_not_installed\n"})
    site("good-plugin", {PASSES: {"good-pass": "good_mod:ThePass"}}, {"good_mod": good_pass("good-pass")})
    registry = Registry.discover()

    [broken] = [b for b in registry.broken if b.name == "broken-pass"]
    assert broken == Broken(PASSES, "broken-pass", "broken-plugin",
                            "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'")
    assert broken.describe() == ("pass 'broken-pass' from broken-plugin: "
                                 "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'")
    names = {e.name for e in registry.pass_entries()}
    assert "good-pass" in names and "broken-pass" not in names
    assert {e.name for e in registry.pass_entries() if e.package == "bitpass"}  # built-ins still there
    with pytest.raises(RegistryError, match="pass 'broken-pass' from package broken-plugin failed to load"):
        registry.pass_class("broken-pass")


def test_a_plugin_raising_anything_at_import_is_contained(site):
    site("crashy-plugin", {PASSES: {"crashy": "crashy_mod:ThePass"}},
         {"crashy_mod": "raise RuntimeError('plugin misconfigured\\nmore detail')\n"})
    registry = Registry.discover()
    [broken] = [b for b in registry.broken if b.name == "crashy"]
    assert broken.error == "RuntimeError: plugin misconfigured"


def test_two_packages_registering_one_pass_name_is_an_error_naming_both(site):
    site("alpha-plugin", {PASSES: {"shared-pass": "alpha_mod:ThePass"}}, {"alpha_mod": good_pass("shared-pass")})
    site("beta-plugin", {PASSES: {"shared-pass": "beta_mod:ThePass"}}, {"beta_mod": good_pass("shared-pass")})
    registry = Registry.discover()
    with pytest.raises(RegistryError) as err:
        registry.pass_class("shared-pass")
    message = str(err.value)
    assert "'shared-pass' is registered by more than one package" in message
    assert "alpha-plugin" in message and "beta-plugin" in message
    with pytest.raises(RegistryError, match="alpha-plugin"):
        registry.pipeline("shared-pass")


def test_a_plugin_may_not_take_a_built_in_name(site):
    registry = Registry.discover()
    built_in = next(e.name for e in registry.pass_entries() if e.package == "bitpass")
    site("squatter", {PASSES: {built_in: "squat_mod:ThePass"}}, {"squat_mod": good_pass(built_in)})
    with pytest.raises(RegistryError, match=f"'{built_in}' is registered by more than one package: .*bitpass"):
        Registry.discover().pass_class(built_in)


def test_entry_points_that_do_not_name_the_right_kind_of_object_are_broken_with_a_reason(site):
    site("odd-plugin", {
        PASSES: {"a-function": "odd_mod:helper", "misnamed": "odd_mod:ThePass"},
        BACKENDS: {"not-a-backend": "odd_mod:ThePass"},
        PIPELINES: {"not-a-spec": "odd_mod:NUMBER"},
    }, {"odd_mod": good_pass("actual-name") + "\ndef helper():\n    pass\n\nNUMBER = 42\n"})
    registry = Registry.discover()
    reasons = {b.name: b for b in registry.broken if b.package == "odd-plugin"}
    assert "does not name a bitpass Pass subclass" in reasons["a-function"].error
    assert "has name 'actual-name', not the entry point's 'misnamed'" in reasons["misnamed"].error
    assert "does not name a bitpass Backend subclass" in reasons["not-a-backend"].error
    assert reasons["not-a-backend"].describe().startswith("backend 'not-a-backend' from odd-plugin: ")
    assert "must name a spec string (got int)" in reasons["not-a-spec"].error
    assert reasons["not-a-spec"].describe().startswith("pipeline 'not-a-spec' from odd-plugin: ")


def test_a_broken_pipeline_is_named_when_asked_for(site):
    site("pipe-broken", {PIPELINES: {"fast": "missing_pipe_mod:SPEC"}}, {})
    with pytest.raises(RegistryError, match="pipeline 'fast' from package pipe-broken failed to load"):
        Registry.discover().pipeline("fast")


def test_a_pipeline_name_inside_a_spec_is_explained():
    with pytest.raises(UsageError, match="'optimize' is a named pipeline, not a pass"):
        Registry.discover().pipeline("optimize,quantize")


def test_a_plugin_pipeline_builds_from_its_spec(site):
    site("pipe-plugin", {PASSES: {"pipe-pass": "pipe_mod:ThePass"},
                         PIPELINES: {"pipe-default": "pipe_mod:SPEC"}},
         {"pipe_mod": good_pass("pipe-pass") + '\nSPEC = "pipe-pass(level=2),pipe-pass"\n'})
    registry = Registry.discover()
    pipeline = registry.pipeline("pipe-default")
    assert isinstance(pipeline, Pipeline) and pipeline.name == "pipe-default"
    assert pipeline.spec() == "pipe-pass(level=2),pipe-pass"
    assert registry.pipeline_spec("pipe-default") == "pipe-pass(level=2),pipe-pass"


# --- plugin files ------------------------------------------------------------------------------

PLUGIN_FILE = '''
import abc
from bitpass.passes.infra import Pass, PassResult, PRESERVE_ALL
from bitpass.frontend import annotation


class MarkBase(Pass):
    """A helper base without a name: abstract, so it is not registered."""

    @abc.abstractmethod
    def value(self): ...

    def run(self, model, ctx):
        for layer in model.layers():
            annotation.set(layer.node, "plugin.mark", self.value())
        return PassResult(model, modified=True, preserved=PRESERVE_ALL)


class MarkLayers(MarkBase):
    """Mark every layer."""

    name = "mark-layers"

    def value(self):
        return "marked"


class Unnamed(Pass):
    """Concrete but forgot its name."""

    def run(self, model, ctx):
        return PassResult(model, modified=False)
'''


def test_plugin_paths_load_a_users_file(tmp_path):
    path = tmp_path / "my_passes.py"
    path.write_text(PLUGIN_FILE)
    registry = Registry.discover(plugin_paths=[path])
    entry = next(e for e in registry.pass_entries() if e.name == "mark-layers")
    assert entry.package == str(path) and entry.obj.summary() == "Mark every layer."
    assert "Pass" not in {e.name for e in registry.pass_entries()}  # imported names are not registered
    assert not any(b.name == "" or "MarkBase" in b.name for b in registry.broken)
    [unnamed] = [b for b in registry.broken if b.package == str(path)]
    assert unnamed.name == "Unnamed" and "has name None" in unnamed.error

    out = registry.pipeline("mark-layers").run(tiny_model(), PassContext())
    assert annotation.get(out.layers()[0].node, "plugin.mark") == "marked"


def test_plugin_paths_may_name_a_package_folder(tmp_path):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "options.py").write_text("from bitpass.passes.infra import PassConfig\n"
                                        "class Options(PassConfig):\n    level: int = 7\n")
    (package / "__init__.py").write_text(good_pass("folder-pass").replace(
        "class Options(PassConfig):\n    level: int = 1\n", "from .options import Options\n"))
    registry = Registry.discover(plugin_paths=[package])
    assert registry.pass_class("folder-pass")().config.level == 7  # relative imports work


def test_a_plugin_file_that_fails_to_import_is_an_error_naming_the_file(tmp_path):
    """The user named the file: a plugin that raises at import is reported, never silently missing."""
    path = tmp_path / "bad_passes.py"
    path.write_text("raise ImportError('needs tensorflow')\n")
    with pytest.raises(RegistryError, match="bad_passes.py' failed to import: ImportError: needs tensorflow"):
        Registry.discover(plugin_paths=[path])


@pytest.mark.parametrize("code", ["0", "None", "'bye'"])
def test_a_plugin_file_calling_sys_exit_at_import_is_an_error_not_an_exit(tmp_path, code):
    path = tmp_path / "quitter.py"
    path.write_text(f"import sys\nsys.exit({code})\n")
    with pytest.raises(RegistryError, match=r"quitter.py' failed to import: called sys.exit"):
        Registry.discover(plugin_paths=[path])


def test_a_pass_whose_constructor_exits_is_named(tmp_path):
    path = tmp_path / "starter.py"
    path.write_text(good_pass("exits-early").replace("    Config = Options\n", "    Config = Options\n\n"
                    "    def __init__(self, **options):\n        import sys\n        sys.exit(0)\n"))
    registry = Registry.discover(plugin_paths=[path])
    with pytest.raises(RegistryError, match="pass 'exits-early' from .*starter.py failed to start: called sys.exit"):
        registry.pipeline("exits-early")


@pytest.mark.parametrize("name", ["absent.py", "notes.txt"])
def test_a_plugin_path_that_is_not_python_is_a_usage_error(tmp_path, name):
    if name.endswith(".txt"):
        (tmp_path / name).write_text("hello")
    with pytest.raises(UsageError, match="not a .py file or a package folder"):
        Registry.discover(plugin_paths=[tmp_path / name])


# --- lookup ------------------------------------------------------------------------------------

def test_unknown_pass_is_a_usage_error_with_a_suggestion(tmp_path):
    path = tmp_path / "my_passes.py"
    path.write_text(PLUGIN_FILE)
    registry = Registry.discover(plugin_paths=[path])
    with pytest.raises(UsageError, match="unknown pass 'mark-layer'; did you mean 'mark-layers'\\?"):
        registry.pass_class("mark-layer")
    with pytest.raises(UsageError, match="unknown pass 'zzzz'; `bitpass passes` lists them all"):
        registry.pipeline("zzzz")


def test_the_unknown_pass_message_stays_one_short_line_with_many_plugins(tmp_path):
    """However many passes (and broken plugins) are installed: the closest names, and where to find the rest."""
    path = tmp_path / "many.py"
    path.write_text("".join(good_pass(f"pass-number-{i}", cls=f"P{i}") for i in range(300))
                    + "".join(f"class B{i}(ThePass0):\n    name = 'Bad_{i}'\n" for i in range(50)).replace(
                        "ThePass0", "P0"))
    registry = Registry.discover(plugin_paths=[path])
    with pytest.raises(UsageError) as err:
        registry.pipeline("pass-number-1000")
    message = str(err.value)
    assert "\n" not in message and len(message) < 300, message
    assert "did you mean 'pass-number-100'" in message and "`bitpass passes`" in message


def test_unknown_backend_and_pipeline_are_usage_errors():
    registry = Registry.discover()
    with pytest.raises(UsageError, match="unknown backend 'onnxruntme'; did you mean 'onnxruntime'"):
        registry.backend("onnxruntme")
    with pytest.raises(UsageError, match="unknown pipeline 'defualt'; did you mean 'default'"):
        registry.pipeline_spec("defualt")


def test_pipelines_build_from_text_and_files_with_validated_options(tmp_path):
    path = tmp_path / "my_passes.py"
    path.write_text(PLUGIN_FILE + good_pass("tunable", cls="Tunable"))
    registry = Registry.discover(plugin_paths=[path])
    assert registry.pipeline("mark-layers,tunable(level=3)").spec() == "mark-layers,tunable(level=3)"
    spec_file = tmp_path / "p.yaml"
    spec_file.write_text("passes:\n  - tunable: {level: 5}\n  - mark-layers\n")
    pipeline = registry.pipeline(str(spec_file))
    assert pipeline.name == "p.yaml" and pipeline.spec() == "tunable(level=5),mark-layers"
    with pytest.raises(UsageError, match="pass 'tunable': unknown option 'levle' \\(valid: level\\)"):
        registry.pipeline("tunable(levle=3)")


def test_every_registered_pass_has_a_summary_and_a_spec_that_round_trips():
    registry = Registry.discover()
    for entry in registry.pass_entries():
        assert entry.obj.summary(), f"pass {entry.name!r} has no docstring summary"
        try:
            default = entry.obj()
        except UsageError:  # a pass with required options
            continue
        rebuilt = registry.pipeline(default.spec()).passes[0]
        assert rebuilt.config == default.config, entry.name
