"""Packaging guard: every source folder ships in the wheel, typed, and every built-in entry point resolves.

The namespace ``bitpass`` has no ``__init__.py``; pyproject maps each root
folder to ``bitpass.<name>``. A subpackage missing from ``packages`` still
works in an editable install but vanishes from the wheel, so this test walks
the folders and compares them with pyproject.
"""

from __future__ import annotations

import importlib
import inspect
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED_ROOTS = ("frontend", "passes", "backends", "plugins", "tools")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def source_folders() -> dict[str, Path]:
    """``bitpass.<dotted>`` -> folder, for every folder holding .py files.

    Folders with their own pyproject.toml (a separate distribution, such as the
    sample plugin) and everything below them are not part of bitpass.
    """
    found: dict[str, Path] = {}
    for root in MAPPED_ROOTS:
        for folder in sorted([ROOT / root, *(p for p in (ROOT / root).rglob("*") if p.is_dir())]):
            relative = folder.relative_to(ROOT)
            if "__pycache__" in relative.parts or any(part.startswith(".") for part in relative.parts):
                continue
            if any((ROOT.joinpath(*relative.parts[: i + 1]) / "pyproject.toml").is_file()
                   for i in range(len(relative.parts))):
                continue
            if any(folder.glob("*.py")):
                found["bitpass." + ".".join(relative.parts)] = folder
    return found


FOLDERS = source_folders()


def test_the_walk_finds_the_core_packages():
    assert {"bitpass.frontend", "bitpass.passes", "bitpass.plugins", "bitpass.tools"} <= set(FOLDERS)
    assert not any("sample" in name for name in FOLDERS)


def test_every_source_folder_is_a_listed_package_with_a_matching_package_dir():
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    missing = sorted(name for name in FOLDERS if name not in packages)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    wrong = {name: package_dir.get(name) for name, folder in FOLDERS.items()
             if package_dir.get(name) != folder.relative_to(ROOT).as_posix()}
    assert not wrong, f"[tool.setuptools.package-dir] entries missing or pointing elsewhere: {wrong}"


def test_every_listed_package_exists():
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for name in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert name in package_dir, f"{name} is listed in packages but has no package-dir entry"
        assert (ROOT / package_dir[name]).is_dir(), f"{name} maps to missing folder {package_dir[name]}"


def test_every_mapped_folder_has_py_typed():
    untyped = sorted(name for name, folder in FOLDERS.items() if not (folder / "py.typed").is_file())
    assert not untyped, f"add an empty py.typed to: {untyped}"


def test_every_mapped_folder_is_a_regular_package():
    no_init = sorted(name for name, folder in FOLDERS.items() if not (folder / "__init__.py").is_file())
    assert not no_init, f"add __init__.py to: {no_init}"


def test_the_namespace_itself_has_no_init():
    assert not (ROOT / "__init__.py").exists()


def test_version_comes_from_the_installed_metadata():
    version = metadata.version("bitpass")
    assert version == PYPROJECT["project"]["version"]


def test_the_cli_script_is_declared():
    assert PYPROJECT["project"]["scripts"]["bitpass"] == "bitpass.tools.cli:main"


def _declared(group: str) -> dict[str, str]:
    return dict(PYPROJECT["project"]["entry-points"][group])


def test_every_declared_pass_names_a_pass_class_with_that_name():
    from bitpass.passes.infra import Pass

    problems = []
    for name, target in _declared("bitpass.passes").items():
        module_name, _, attribute = target.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            problems.append(f"{name} = {target}: {type(err).__name__}: {err}")
            continue
        if not (inspect.isclass(obj) and issubclass(obj, Pass)):
            problems.append(f"{name} = {target}: not a Pass subclass")
        elif getattr(obj, "name", None) != name:
            problems.append(f"{name} = {target}: class name attribute is {getattr(obj, 'name', None)!r}")
        elif inspect.isabstract(obj):
            problems.append(f"{name} = {target}: abstract (run not implemented)")
    assert not problems, "broken bitpass.passes entry points:\n" + "\n".join(problems)


@pytest.mark.parametrize("group", ["bitpass.backends", "bitpass.pipelines"])
def test_other_declared_entry_points_import(group):
    problems = []
    for name, target in _declared(group).items():
        module_name, _, attribute = target.partition(":")
        try:
            getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            problems.append(f"{name} = {target}: {type(err).__name__}: {err}")
    assert not problems, f"broken {group} entry points:\n" + "\n".join(problems)


@pytest.mark.parametrize("group", ["bitpass.passes", "bitpass.backends", "bitpass.pipelines"])
def test_the_installed_entry_points_match_pyproject(group):
    installed = {ep.name: ep.value for ep in metadata.distribution("bitpass").entry_points if ep.group == group}
    assert installed == _declared(group), (
        f"the installed metadata of bitpass is stale for {group}: run `pip install -e .` again")
