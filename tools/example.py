"""The bundled example: a digits CNN trained on scikit-learn's data, compiled with the default pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def prepare(directory: Path, progress: Callable[[str], None] | None = None) -> tuple[Path, Path, Path]:
    """Train the CNN (seeded) and write model.onnx, calib.npz, eval.npz into ``directory``."""
    import torch

    from bitpass.frontend import from_torch
    from bitpass.tools import zoo

    say = progress or (lambda _m: None)
    directory.mkdir(parents=True, exist_ok=True)
    say("training the digits CNN on scikit-learn's digits (1,100 training images)")
    module, split = zoo.trained_digits_cnn()
    say(f"fp32 held-out accuracy {100 * zoo.accuracy(module, split.eval_x, split.eval_y):.2f} %; exporting to ONNX")
    model_path, calib_path, eval_path = directory / "model.onnx", directory / "calib.npz", directory / "eval.npz"
    from_torch(module, (torch.zeros(1, 1, 8, 8),)).save(model_path)
    np.savez(calib_path, input=split.calib_x)
    np.savez(eval_path, input=split.eval_x, labels=split.eval_y)
    return model_path, calib_path, eval_path


def run_example(directory: Path, *, force: bool = False,
                progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Path]:
    from bitpass.tools.api import compile as compile_model

    model_path, calib_path, eval_path = prepare(directory, progress)
    artifact = compile_model(model_path, directory / "artifact", calibration=calib_path, evaluation=eval_path,
                             force=force, progress=progress)
    return artifact.manifest, artifact.path
