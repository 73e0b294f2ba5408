"""Measure a bit plan's accuracy (for ``accuracy-drop=`` budgets): materialize it, run it in ONNX Runtime.

Each plan is materialized (``materialize.packed_plan``: the ``packed`` format, what
``allocate-bits`` picks when no compute format is faster; its accuracy equals the weight
quantization's) and run on the evaluation data: accuracy when the data has labels, else top-1
agreement with the fp32 model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import UsageError
from bitpass.passes import execution
from bitpass.passes.infra import make_config
from bitpass.passes.materialize import FLOAT_BITS, QuantizeOptions, materialize, packed_plan


def top1(model: execution.ModelSource, data: Dataset) -> np.ndarray:
    """The index of the largest value of the first output, per sample."""
    logits = execution.predict(model, data, batch_size=256)
    return logits.reshape(len(logits), -1).argmax(axis=1)


def plan_evaluator(model: Model, data: Dataset | None, *,
                   block_size: int = 32) -> Callable[[Mapping[str, int]], float]:
    """A callable ``{layer_id: bits} -> accuracy in [0, 1]`` on ``data`` (the caller records that it was used).

    Layers the plan does not name stay fp32."""
    if data is None:
        raise UsageError("an accuracy-drop budget needs evaluation data (--eval FILE) to measure each plan")
    target = (data.labels if data.labels is not None else top1(model, data)).reshape(-1)
    options = make_config(QuantizeOptions, {"block_size": block_size, "preprocess": False}, "quantize")

    def evaluate(plan: Mapping[str, int]) -> float:
        bits = {layer.id: int(plan.get(layer.id, FLOAT_BITS)) for layer in model.layers()}
        return float((top1(materialize(model, packed_plan(bits), options=options), data) == target).mean())

    return evaluate
