"""Import a PyTorch module: torch.export, then the dynamo ONNX exporter (the TorchScript exporter where torch.export
cannot trace the module)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

from bitpass.frontend.errors import ModelLoadError
from bitpass.frontend.model import Model, proto_sha256
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
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch colours its messages
        first = first.splitlines()[0] if first else type(err).__name__
        proto = _torchscript_export(module, args, input_names, dynamic_batch)
        if proto is None:
            raise ModelLoadError(f"torch export of {type(module).__name__} failed: {first}") from err
        model = from_proto(proto, name=type(module).__name__, kind="torch")
        # the TorchScript graph's node names are not module paths: passes that need the module (gradients,
        # channel pruning) treat it as an ONNX model
        model.provenance.notes.append(f"torch.export failed ({first[:200]}); exported with the TorchScript "
                                      f"exporter (dynamo=False, opset {TORCHSCRIPT_OPSET}) instead")
        return model
    proto = program.model_proto
    digest = proto_sha256(proto)
    fold_weight_transposes(proto)
    model = from_proto(proto, name=type(module).__name__, sha256=digest, kind="torch")
    model.torch_module = module
    return model


#: the newest opset the TorchScript exporter writes (the fallback for modules torch.export cannot trace)
TORCHSCRIPT_OPSET = 20


def _torchscript_export(module: Any, args: tuple[Any, ...], input_names: Sequence[str] | None,
                        dynamic_batch: bool) -> Any | None:
    """``module`` through the TorchScript exporter (what users run when torch.export fails: T5's reshapes of
    symbolic strides, for one), the first axis dynamic; None when that fails too."""
    import inspect

    import onnx
    import torch

    try:
        names = list(input_names) if input_names else \
            [p for p in inspect.signature(module.forward).parameters][:len(args)]
    except (TypeError, ValueError):
        names = [f"input_{i}" for i in range(len(args))]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buffer, dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                              input_names=names, dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch
                              else None)
    except Exception:  # noqa: BLE001 - the caller reports torch.export's error, the one users search for
        return None
    return onnx.load_from_string(buffer.getvalue())


def fold_weight_transposes(proto: Any) -> None:
    """Replace ``Transpose(initializer)`` by the transposed initializer, in place (exact).

    ``nn.Linear`` on an input of rank > 2 (every transformer) exports as ``MatMul(x, Transpose(weight))``:
    without this the imported model has no constant-weight MatMul, so the reference model has no
    layers (empty manifest layer records) and the layer ids assigned after folding are not module paths.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    kept, sources = [], set()
    for node in graph.node:
        source = node.input[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") \
            and len(node.input) == 1 else None
        if source in initializers:
            array = numpy_helper.to_array(initializers[source])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(np.transpose(array, perm)), node.output[0]))
            sources.add(source)
            continue
        kept.append(node)
    if not sources:
        return
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    unused = [t for t in graph.initializer if t.name in sources and t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
