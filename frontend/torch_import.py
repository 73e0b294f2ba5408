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
    fold_weight_transposes(proto)
    model = from_proto(proto, name=type(module).__name__, sha256=digest, kind="torch")
    model.torch_module = module
    return model


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
