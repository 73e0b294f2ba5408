"""Each layer's input activations over a data set, computed with ONNX Runtime (no torch needed).

Passes that score or refine weights from what the layers actually see (Wanda's input norms,
rounding refinement's Gram matrices) share this: the layers' data inputs become extra outputs of a
copy of the model (``execution.intermediates``), which then runs batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from bitpass.frontend import Dataset, Layer, Model
from bitpass.frontend.errors import BitpassError
from bitpass.passes import execution


def layer_inputs(model: Model, data: Dataset, layers: Iterable[Layer], *,
                 batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of ``data``: ``{layer_id: the layer's data input}`` (input 0; Gather layers are left out)."""
    layers = [layer for layer in layers if layer.op_type != "Gather"]
    names = []
    for layer in layers:
        value = layer.node.inputs[0]
        if value is None or not value.name:
            raise BitpassError(f"layer {layer.id!r}: its data input has no name")
        names.append(value.name)
    for got in execution.intermediates(model, data, names, batch_size=batch_size,
                                       purpose="run the model to measure layer inputs"):
        yield {layer.id: got[name] for layer, name in zip(layers, names)}


def model_outputs(model: execution.ModelSource, data: Dataset, *, batch_size: int = 256) -> np.ndarray:
    """The model's first output over ``data`` (float64), run in ONNX Runtime: what passes that choose
    between candidate rewrites by measurement compare against the unmodified model."""
    return execution.predict(model, data, batch_size=batch_size).astype(np.float64)
