"""Fixing a model's symbolic dimensions from its data, for backends that compile fixed shapes ahead of time.

A transformer exported with dynamic batch and sequence axes has inputs like ``input_ids[batch x sequence]``.
ONNX Runtime runs that as is; TVM compiles one function per shape, and bitpass's TVM artifacts take the batch
as their only free axis. ``fix_dims`` gives every other symbolic input dimension the size the calibration data
has on it (all samples share it, since a dataset is one array per input), so such a model compiles for the
sequence length the user calibrated with; the artifact then takes exactly that length.
"""

from __future__ import annotations

import onnx_ir as ir

from bitpass.frontend.data import Dataset
from bitpass.frontend.errors import UsageError
from bitpass.frontend.model import Model


def fix_dims(model: Model, data: Dataset) -> dict[str, int]:
    """Set each symbolic input dimension past the first axis to its size in ``data`` (in place); returns
    ``{dimension name: size}`` of those it fixed. Output dimensions of the same name follow. A name given two
    sizes by two inputs is refused: the data does not fit the model."""
    fixed: dict[str, int] = {}
    for value in model.ir.graph.inputs:
        if value.const_value is not None or value.shape is None or value.name not in data.inputs:
            continue
        array = data.inputs[value.name]
        dims = list(value.shape)
        for axis, dim in enumerate(dims):
            if axis == 0 or isinstance(dim, int) or axis >= array.ndim:
                continue
            name = str(dim) if dim.value is not None else f"{value.name}[{axis}]"
            size = int(array.shape[axis])
            if fixed.setdefault(name, size) != size:
                raise UsageError(f"input {value.name!r}: dimension {name!r} is {size} here and {fixed[name]} in "
                                 f"another input of the data")
            dims[axis] = size
        value.shape = ir.Shape(dims)
    for value in model.ir.graph.outputs:
        if value.shape is not None:
            value.shape = ir.Shape([fixed.get(str(d), d) if not isinstance(d, int) and d.value is not None else d
                                    for d in value.shape])
    return fixed


def check_fixed(fixed: dict[str, int], model: Model, data: Dataset, role: str) -> None:
    """Refuse ``data`` whose arrays differ from the sizes ``fix_dims`` fixed (the artifact takes only those)."""
    for spec in model.inputs:
        array = data.inputs.get(spec.name)
        if array is None or spec.shape is None:
            continue
        for axis, want in enumerate(spec.shape):
            if axis and isinstance(want, int) and axis < array.ndim and array.shape[axis] != want:
                named = next((n for n, s in fixed.items() if s == want), str(want))
                raise UsageError(f"{role} data: {spec.name!r} has size {array.shape[axis]} on axis {axis}, but the "
                                 f"artifact is compiled for {named}={want} (the calibration data's size); give "
                                 f"{role} samples of that size")
