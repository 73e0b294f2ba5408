"""The bundled example: a digits CNN trained on scikit-learn's data, compiled with the default pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


#: records what ``prepare`` wrote, so a rerun replaces its own files and never a user's
EXAMPLE_RECORD = ".bitpass-example.json"


def prepare(directory: Path, progress: Callable[[str], None] | None = None) -> tuple[Path, Path, Path]:
    """Train the CNN (seeded) and write model.onnx, calib.npz, eval.npz into ``directory``.

    A file of those names that this function did not write earlier (its sha256 is not in the record) is
    never overwritten: the example stops with an error naming it."""
    import hashlib
    import io
    import json

    import torch

    from bitpass.frontend import from_torch
    from bitpass.frontend.errors import UsageError
    from bitpass.tools import zoo

    say = progress or (lambda _m: None)
    names = ("model.onnx", "calib.npz", "eval.npz")
    record_path = directory / EXAMPLE_RECORD
    try:
        written = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except ValueError:
        written = {}
    for name in names:
        path = directory / name
        if (path.exists() or path.is_symlink()) and (path.is_symlink() or not path.is_file() or
                                                      hashlib.sha256(path.read_bytes()).hexdigest() != written.get(name)):
            raise UsageError(f"{path} exists and was not written by `bitpass example`; refusing to overwrite it: "
                             f"give the example another folder")
    directory.mkdir(parents=True, exist_ok=True)
    say("training the digits CNN on scikit-learn's digits (1,100 training images)")
    module, split = zoo.trained_digits_cnn()
    say(f"fp32 held-out accuracy {100 * zoo.accuracy(module, split.eval_x, split.eval_y):.2f} %; exporting to ONNX")
    contents = {"model.onnx": from_torch(module, (torch.zeros(1, 1, 8, 8),)).to_bytes()}
    for name, arrays in (("calib.npz", {"input": split.calib_x}),
                         ("eval.npz", {"input": split.eval_x, "labels": split.eval_y})):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        contents[name] = buffer.getvalue()
    for name, data in contents.items():
        (directory / name).write_bytes(data)
        written[name] = hashlib.sha256(data).hexdigest()
        record_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return directory / "model.onnx", directory / "calib.npz", directory / "eval.npz"


def run_example(directory: Path, *, force: bool = False,
                progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Path]:
    from bitpass.tools.api import compile as compile_model

    model_path, calib_path, eval_path = prepare(directory, progress)
    artifact = compile_model(model_path, directory / "artifact", calibration=calib_path, evaluation=eval_path,
                             force=force, progress=progress)
    return artifact.manifest, artifact.path
