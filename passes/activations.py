"""Each layer's input activations over a data set, computed with ONNX Runtime (no torch needed).

Passes that score or refine weights from what the layers actually see (Wanda's input norms,
rounding refinement's Gram matrices) share this: the layers' data inputs become extra outputs of a
copy of the model, which then runs batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from bitpass.frontend import Dataset, Layer, Model
from bitpass.frontend.errors import BitpassError


def layer_inputs(model: Model, data: Dataset, layers: Iterable[Layer], *,
                 batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of ``data``: ``{layer_id: the layer's data input}`` (input 0; Gather layers are left out)."""
    import onnxruntime as ort

    layers = [layer for layer in layers if layer.op_type != "Gather"]
    proto = model.to_proto()
    graph_inputs = {i.name for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    wanted: dict[str, ir.Value] = {}
    for layer in layers:
        value = layer.node.inputs[0]
        if value is None or not value.name:
            raise BitpassError(f"layer {layer.id!r}: its data input has no name")
        wanted[value.name] = value
    for name, value in wanted.items():
        if name not in graph_inputs and name not in outputs:
            dtype = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT's own exception types
        raise BitpassError(f"ONNX Runtime cannot run the model to measure layer inputs: "
                           f"{str(err).strip().splitlines()[0]}") from err
    fetch = [n for n in wanted if n not in graph_inputs]
    for feeds in data.batches(batch_size):
        got = dict(zip(fetch, session.run(fetch, feeds))) if fetch else {}
        got.update({n: feeds[n] for n in wanted if n in graph_inputs})
        yield {layer.id: got[layer.node.inputs[0].name] for layer in layers}


def model_outputs(model_bytes: bytes, data: Dataset, *, batch_size: int = 256) -> np.ndarray:
    """The model's first output over ``data`` (float64), run in ONNX Runtime: what passes that choose
    between candidate rewrites by measurement compare against the unmodified model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feeds)[0] for feeds in data.batches(batch_size)]).astype(np.float64)
