"""Import a PyTorch module: torch.export, then the dynamo ONNX exporter."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from typing import Any

from bitpass.frontend.errors import ModelLoadError
from bitpass.frontend.model import Model
from bitpass.frontend.onnx_import import from_proto

#: Opset the exporter targets; 21 is what ORT needs for blocked int4 Q/DQ.
EXPORT_OPSET = 21


def from_torch(module: Any, example_inputs: Sequence[Any] | Any, *, input_names: Sequence[str] | None = None,
               dynamic_batch: bool = True) -> Model:
    """Export ``module`` (in eval mode) with ``example_inputs``; the first axis stays dynamic."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    if not args:
        raise ModelLoadError("from_torch needs example_inputs: one tensor per forward() argument")
    module = module.eval()
    dynamic_shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in args) if dynamic_batch else None
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, optimize=False, opset_version=EXPORT_OPSET,
                dynamic_shapes=dynamic_shapes, input_names=list(input_names) if input_names else None,
                verbose=False,
            )
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"torch export of {type(module).__name__} failed: {first}") from err
    proto = program.model_proto
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    model = from_proto(proto, name=type(module).__name__, sha256=digest, kind="torch")
    model.torch_module = module
    return model
