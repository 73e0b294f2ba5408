"""What a rounded layer costs the model's output: the score the two-level allocation can sum across layers.

A layer's own output error ``tr(E^T H E)`` weighs layers by the scale of their own outputs, not by their effect
on the model's output; ``OutputKL`` measures that effect directly: the mean per-position KL divergence of the
model's output distribution (a language model's logits) on calibration samples, with only that layer's weight
replaced by a rounded one, everything else fp32. It runs in ONNX Runtime over an ``OutputProbe``
(``passes/sensitivity/output.py``): one session whose weights are overridable inputs, and per layer only the
nodes downstream of it.
"""

from __future__ import annotations

import numpy as np
import scipy.special

from bitpass.frontend import Dataset, Model
from bitpass.frontend.decoder import lm_spec
from bitpass.frontend.layers import Layer
from bitpass.passes.sensitivity.output import OutputProbe

#: positions per block of the KL (float64 temporaries of a few MB, never a whole vocabulary x positions copy)
KL_ROWS = 64


def stored_layout(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    """A ``(K, N)`` MatMul-form weight (what ``emit.linear_weight`` gives) back in the layout the layer's
    initializer stores: a Gemm's ``alpha`` divided out and ``transB`` undone."""
    node = layer.node
    if node.op_type != "Gemm":
        return np.ascontiguousarray(matrix, np.float32)
    unscaled = np.asarray(matrix, np.float32) / np.float32(node.attributes.get_float("alpha", 1.0))
    return np.ascontiguousarray(unscaled.T if node.attributes.get_int("transB", 0) else unscaled)


class OutputKL:
    """``score(layer, matrix)``: the model's output KL to fp32 on ``samples`` calibration samples with only
    ``layer``'s weight replaced by ``matrix`` (``(K, N)``). The probe holds a second copy of the model's weights
    in its ONNX Runtime session while it lives: drop it when scoring is done."""

    def __init__(self, model: Model, layers: list[Layer], data: Dataset, *, samples: int = 16,
                 batch_size: int = 8) -> None:
        names = list(dict.fromkeys(layer.weight.name or "" for layer in layers))
        batches = list(data.head(min(samples, len(data))).batches(batch_size))
        self.probe = OutputProbe(model.to_proto(), names, batches, in_place=True, suffixes=True)
        spec = lm_spec(model)
        wanted = [spec.logits] if spec is not None and spec.logits in self.probe.output_names \
            else self.probe.output_names
        self.outputs = [self.probe.output_names.index(n) for n in wanted]

    def __call__(self, layer: Layer, matrix: np.ndarray) -> float:
        outputs = self.probe.run({layer.weight.name or "": stored_layout(layer, matrix)})
        return sum(mean_kl(self.probe.reference[i], outputs[i]) for i in self.outputs)


def mean_kl(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(output)) on the last axis, block by block."""
    width = reference.shape[-1]
    ref_rows, out_rows = reference.reshape(-1, width), np.asarray(output).reshape(-1, width)
    total = 0.0
    for start in range(0, len(ref_rows), KL_ROWS):
        lp = scipy.special.log_softmax(ref_rows[start:start + KL_ROWS].astype(np.float64), axis=-1)
        lq = scipy.special.log_softmax(out_rows[start:start + KL_ROWS].astype(np.float64), axis=-1)
        total += float(np.sum(np.exp(lp) * (lp - lq)))
    return total / max(1, len(ref_rows))

