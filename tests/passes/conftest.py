"""Fixtures of the pass tests: real exports of the model-family corpus (fast configs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bitpass.tools import model_families as mf


@pytest.fixture(scope="session")
def family_export(tmp_path_factory) -> Callable[..., tuple[Path, mf.Built]]:
    """``family_export(name, eval_labels=True)`` -> ``(path, built)``: the family's fast build exported by
    TorchScript at opset 17, with ``calib.npz`` and ``eval.npz`` beside it (``eval_labels=False`` keeps only
    the model inputs in ``eval.npz``); built once per test session and name (read-only: the files and ``built``
    are shared by every module that asks)."""
    made: dict[tuple[str, bool], tuple[Path, mf.Built]] = {}

    def export(name: str, *, eval_labels: bool = True) -> tuple[Path, mf.Built]:
        if (name, eval_labels) not in made:
            built = mf.build(name, "fast")
            folder = tmp_path_factory.mktemp(name)
            path = mf.export(built, mf.EXPORTS["torchscript-17"], folder)
            np.savez(folder / "calib.npz", **built.calibration)
            np.savez(folder / "eval.npz", **(built.evaluation if eval_labels else built.inputs_of(built.evaluation)))
            made[name, eval_labels] = (path, built)
        return made[name, eval_labels]

    return export
