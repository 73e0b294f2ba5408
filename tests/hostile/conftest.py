"""Fixtures of the hostile corpus: one fork server per session, one sandbox per case.

The kit (``kit.py``) is registered as the module ``hostile_kit`` so that every test module of this
folder imports the same sandbox, runner, checker and input builders.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import configuration

# hypothesis keeps caches (constants, unicode tables) in ./.hypothesis even without an example
# database: keep them out of the repository
configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "bitpass-tests-hypothesis")


def _load_kit():
    if "hostile_kit" in sys.modules:
        return sys.modules["hostile_kit"]
    spec = importlib.util.spec_from_file_location("hostile_kit", Path(__file__).with_name("kit.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hostile_kit"] = module
    spec.loader.exec_module(module)
    return module


kit = _load_kit()


@pytest.fixture(scope="session")
def zygote() -> Iterator[kit.Zygote]:
    server = kit.Zygote()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def box(tmp_path: Path, zygote: kit.Zygote) -> kit.Sandbox:
    """A fresh sandbox: work/ (cwd, the user's files), outside/ (the canary), home/, cache/, tmp/."""
    return kit.Sandbox(tmp_path / "case", zygote)
