"""Driving ONNX Runtime's static quantizer: its pre-processing, and int8 QDQ with bitpass's own ranges.

Calibrated ranges are handed to ``quantize_static`` as a calibration cache, so ONNX Runtime does not
recalibrate; layers that are not int8 are excluded by name (``nodes_to_include`` does not restrict).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import onnx

from bitpass.frontend.errors import BitpassError
from bitpass.passes.analyses import ActivationRanges
from bitpass.passes.execution import first_line


def preprocess(path: Path, tmp: Path, layer_names: set[str]) -> tuple[Path, str | None]:
    """``quant_pre_process`` (symbolic shape inference skipped); without its optimizer if that renamed a layer.

    Returns the model to quantize and a note for the provenance (None when all went as planned)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "pre.onnx"
    try:
        quant_pre_process(str(path), str(out), skip_symbolic_shape=True)
        names = {n.name for n in onnx.load(str(out)).graph.node}
        if layer_names <= names:
            return out, None
        lost = sorted(layer_names - names)
        quant_pre_process(str(path), str(out), skip_symbolic_shape=True, skip_optimization=True)
        return out, f"quant_pre_process optimizer skipped: it would have merged layer node(s) {', '.join(lost)}"
    except Exception as err:  # pre-processing is an optimization: quantize the model as it is
        return path, f"quant_pre_process skipped: {first_line(err)}"


def quantize_int8(path: Path, output: Path, ranges: ActivationRanges, exclude: Iterable[str], *,
                  per_channel: bool = True, reduce_range: bool = False,
                  activation_type: Literal["int8", "uint8"] = "int8", symmetric_activations: bool = False) -> Path:
    """Static int8 QDQ of every quantizable node not in ``exclude`` (per-channel symmetric int8 weights)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    cache = output.with_name("ranges.json")
    save_tensors_data(ranges.to_tensors_data(), cache)
    try:
        quantize_static(
            str(path), str(output), None, quant_format=QuantFormat.QDQ,
            per_channel=per_channel, reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=cache,
            extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True,
                           **graph_output_ranges(onnx.load(str(path), load_external_data=False), ranges)},
        )
    except Exception as err:
        raise BitpassError(f"ONNX Runtime's int8 quantizer failed: {first_line(err)}") from err
    return output


def graph_output_ranges(model: onnx.ModelProto, ranges: ActivationRanges) -> dict[str, object]:
    """ORT ``TensorQuantOverrides`` pinning graph outputs read by Relu/Clip to their own calibrated ranges.

    ORT's quantizer gives a Relu/Clip input the activation's output range when the activation is its
    only consumer (``adjust_tensor_ranges``) without checking that the input is also a graph output: a
    model returning a MatMul's result beside Relu(MatMul) got that output back with its negatives
    clipped to zero. Overrides win over that adjustment.
    """
    import numpy as np

    outputs = {o.name for o in model.graph.output}
    read_by_activation = {name for node in model.graph.node if node.op_type in ("Relu", "Clip")
                          for name in node.input[:1]}
    pinned = {}
    for name in sorted(outputs & read_by_activation):
        if name in ranges:
            low, high = ranges[name]
            pinned[name] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return {"TensorQuantOverrides": pinned} if pinned else {}
