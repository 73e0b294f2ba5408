"""Measure a bit plan's accuracy (for ``accuracy-drop=`` budgets): materialize it, run it in ONNX Runtime.

Each plan is applied to a copy of the model in the ``packed`` format (what
``allocate-bits`` picks when no compute format is faster; its accuracy equals
the weight quantization's) and run on the context's evaluation data: accuracy
when the data has labels, else top-1 agreement with the fp32 model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from bitpass.frontend import Dataset, Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.passes.infra import PassContext

FLOAT_BITS = 32


def _predict(model_bytes: bytes, data: Dataset) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    outputs = [session.run(None, feeds)[0] for feeds in data.batches(256)]
    logits = np.concatenate(outputs)
    return logits.reshape(len(logits), -1).argmax(axis=1)


def plan_evaluator(model: Model, ctx: PassContext, *, block_size: int = 32) -> Callable[[dict[str, int]], float]:
    """A callable ``plan -> accuracy in [0, 1]`` on ``ctx.evaluation`` (the caller records that it was used)."""
    from bitpass.passes.calibrate import ACTIVATION_RANGES
    from bitpass.passes.quantize import Quantize

    data = ctx.evaluation
    if data is None:
        raise UsageError("an accuracy-drop budget needs evaluation data (--eval FILE) to measure each plan")
    reference = _predict(model.to_bytes(), data) if data.labels is None else None
    target = data.labels if data.labels is not None else reference
    ranges = ctx.analyses.require(ACTIVATION_RANGES) if ctx.analyses.cached(ACTIVATION_RANGES) else None

    def evaluate(plan: dict[str, int]) -> float:
        copy = model.clone()
        for layer in copy.layers():
            bits = int(plan.get(layer.id, FLOAT_BITS))
            annotation.set_weight_bits(layer.node, bits)
            annotation.set_activation_bits(layer.node, FLOAT_BITS)
            if bits < FLOAT_BITS:
                annotation.set_weight_format(layer.node, "packed")
        inner = PassContext(seed=ctx.seed)
        if ranges is not None:
            inner.analyses.put(ACTIVATION_RANGES, ranges)
        else:  # packed layers need no activation ranges; give quantize an empty set
            from bitpass.passes.calibrate import ActivationRanges

            inner.analyses.put(ACTIVATION_RANGES, ActivationRanges(method="none", ranges={}, samples=0, data_sha256=""))
        quantized = Quantize(block_size=block_size, preprocess=False).run(copy, inner).model
        return float((_predict(quantized.to_bytes(), data) == target.reshape(-1)).mean())

    return evaluate
