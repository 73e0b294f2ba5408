"""The typed keys of the analysis cache, and the facts passes exchange.

One module names what passes hand each other, so a pass that reads a result imports its key from
here, never from the pass that puts it (passes stay independent of each other). Each key says the
type of its value: ``ctx.analyses.put`` checks it, ``ctx.analyses.require`` returns it typed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitpass.frontend import Model
from bitpass.passes.infra import ANNOTATION_FACT, AnalysisKey


@dataclass(frozen=True)
class ActivationRanges:
    """Calibrated ``{tensor name: (lo, hi)}`` with the method and data that produced them."""

    method: str
    ranges: dict[str, tuple[float, float]]
    samples: int
    data_sha256: str
    options: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, tensor: str) -> tuple[float, float]:
        return self.ranges[tensor]

    def __contains__(self, tensor: object) -> bool:
        return tensor in self.ranges

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def to_tensors_data(self) -> Any:
        """The ranges as ONNX Runtime's ``TensorsData`` (tagged MinMax: ORT then uses lo/hi as they are)."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

        return TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for name, (lo, hi) in self.ranges.items()
        })


#: per-tensor activation ranges (``calibrate``), read by ``quantize`` for its int8 layers
ACTIVATION_RANGES: AnalysisKey[ActivationRanges] = AnalysisKey("activation-ranges", ActivationRanges)
#: ``{layer_id: score}``, or ``{layer_id: {bits: loss increase}}`` for per-bit methods (``sensitivity``)
SENSITIVITY: AnalysisKey[Mapping[str, Any]] = AnalysisKey("sensitivity", Mapping)
#: ``{layer_id: {bits: estimated loss increase}}`` for every method (``sensitivity``)
SENSITIVITY_BITS: AnalysisKey[Mapping[str, Any]] = AnalysisKey("sensitivity:bits", Mapping)
#: ``{layer_id: weight bits}`` chosen by an allocation pass
BITS: AnalysisKey[Mapping[str, int]] = AnalysisKey("bits", Mapping)
#: ``{layer_id: {(bits, format): {batch: seconds}}}`` measured by the target's latency probe
LATENCY_VARIANTS: AnalysisKey[Mapping[str, Any]] = AnalysisKey("latency-variants", Mapping)
#: ``{layer_id: bool mask of kept weights}`` (ONNX weight layout), from ``prune``
PRUNING_MASKS: AnalysisKey[Mapping[str, Any]] = AnalysisKey("pruning:masks", Mapping)
#: the model as it was before the first pruning pass (the teacher of ``recover``): a clone sharing the weights the
#: pruning passes replace (never write into), so it costs no copy of them and has no size limit (bytes had 2 GiB)
PRUNING_REFERENCE: AnalysisKey[Model] = AnalysisKey("pruning:reference", Model)
#: what ``quantize`` made of each layer (its record), so later passes know the model is quantized
QUANTIZED: AnalysisKey[Mapping[str, Any]] = AnalysisKey("quantized", Mapping)

#: the fact that layers carry ``bits.*`` annotations (``set-bits``, the allocation passes)
BITS_ANNOTATIONS = ANNOTATION_FACT + "bits"

__all__ = ["ACTIVATION_RANGES", "BITS", "BITS_ANNOTATIONS", "LATENCY_VARIANTS", "PRUNING_MASKS", "PRUNING_REFERENCE",
           "QUANTIZED", "SENSITIVITY", "SENSITIVITY_BITS", "ActivationRanges"]
