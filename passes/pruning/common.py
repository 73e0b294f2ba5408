"""What the pruning passes share: weight layouts per op type, writing constants, activation norms in ORT.

Every quantizable layer's weight has an **output axis** (the dimension indexing the layer's
output features) and an **input axis** (the dimension it reduces over):

=================  ===========  ==========
layer              output axis  input axis
=================  ===========  ==========
Conv (O, I/g, k…)  0            1
ConvTranspose      1            0
Gemm transB=1      0            1
Gemm transB=0      1            0
MatMul (K, N)      1            0
Gather (V, D)      0            1
=================  ===========  ==========
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import numpy as np
import onnx_ir as ir
import pydantic

from bitpass.frontend import Dataset, Layer, Model
from bitpass.frontend.errors import BitpassError
from bitpass.passes.activations import layer_inputs
from bitpass.passes.analyses import PRUNING_REFERENCE
from bitpass.passes.infra import AnalysisManager


def output_axis(layer: Layer) -> int:
    op = layer.op_type
    if op == "ConvTranspose" or op == "MatMul":
        return 1
    if op == "Gemm":
        return 0 if layer.node.attributes.get_int("transB", 0) else 1
    return 0


def input_axis(layer: Layer) -> int:
    op = layer.op_type
    if op in ("ConvTranspose", "MatMul"):
        return 0
    if op == "Gemm":
        return 1 if layer.node.attributes.get_int("transB", 0) else 0
    return 1


def rows_view(array: np.ndarray, axis: int) -> np.ndarray:
    """``array`` as a matrix with dimension ``axis`` first and everything else flattened (a copy)."""
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1).copy()


def from_rows_view(matrix: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved_shape = (shape[axis], *(s for i, s in enumerate(shape) if i != axis))
    return np.moveaxis(matrix.reshape(moved_shape), 0, axis)


def groups_view(array: np.ndarray, axis: int) -> np.ndarray:
    """``array`` with dimension ``axis`` last and the rest flattened: (positions, features) (a copy)."""
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1]).copy()


def from_groups_view(matrix: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved_shape = (*(s for i, s in enumerate(shape) if i != axis), shape[axis])
    return np.moveaxis(matrix.reshape(moved_shape), -1, axis)


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the initializer behind ``value`` (same name) and its shape."""
    array = np.ascontiguousarray(array)
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def feature_scale(layer: Layer, norms: np.ndarray) -> np.ndarray:
    """Per-input-feature activation norms broadcast to ``layer``'s weight shape."""
    shape = layer.weight_shape
    if layer.op_type == "Conv":
        group = layer.node.attributes.get_int("group", 1)
        per_group_in, per_group_out = shape[1], shape[0] // max(group, 1)
        idx = (np.arange(shape[0])[:, None] // per_group_out) * per_group_in + np.arange(per_group_in)[None, :]
        scale = norms[idx]  # (O, I/g)
        return np.broadcast_to(scale.reshape(*scale.shape, *([1] * (len(shape) - 2))), shape)
    axis = input_axis(layer)
    if len(norms) != shape[axis]:
        raise BitpassError(f"layer {layer.id!r}: {len(norms)} input features measured, weight has {shape[axis]}")
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(norms.reshape(view), shape)


def _reduce_axes(layer: Layer, rank: int) -> tuple[int, ...]:
    if layer.op_type in ("Conv", "ConvTranspose"):
        return tuple(a for a in range(rank) if a != 1)
    return tuple(range(rank - 1))


def input_norms(model: Model, data: Dataset, layers: Iterable[Layer], *,
                batch_size: int = 64) -> dict[str, np.ndarray]:
    """``{layer_id: ||X_j||_2}``: the l2 norm of each input feature (channel) of each layer over all
    calibration samples (and spatial positions), computed with ONNX Runtime (Gather layers left out)."""
    layers = [layer for layer in layers if layer.op_type != "Gather"]
    by_id = {layer.id: layer for layer in layers}
    sums: dict[str, np.ndarray] = {}
    for batch in layer_inputs(model, data, layers, batch_size=batch_size):
        for layer_id, x in batch.items():
            x = np.asarray(x, dtype=np.float64)
            sums[layer_id] = sums.get(layer_id, 0) + np.sum(x * x, axis=_reduce_axes(by_id[layer_id], x.ndim))
    return {lid: np.sqrt(s) for lid, s in sums.items()}


def remember_reference(model: Model, analyses: AnalysisManager) -> None:
    """Keep the model as it was before the first pruning pass (the teacher of ``recover``): a clone, whose
    weights stay those of before because pruning gives a layer a new tensor (``set_constant``), never writes into
    one."""
    if not analyses.cached(PRUNING_REFERENCE):
        analyses.put(PRUNING_REFERENCE, model.clone())


def _ids_as_strings(value: object) -> object:
    """Layer ids of a torch export are module paths such as ``0``: a spec's ``[0, 3]`` means those ids."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return value


#: a list of layer ids in a pass config (numbers in a spec are read as the ids they spell)
LayerIds = Annotated[list[str], pydantic.BeforeValidator(_ids_as_strings)]
