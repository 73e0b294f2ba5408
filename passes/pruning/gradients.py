"""Gradient scores on the torch module a model came from (GBLM, ECoFLaP's coarse scores, Taylor channels).

The loss is the sensitivity pass's objective: cross-entropy on the calibration labels, or on the fp32
model's own argmax. Torch weights are found by layer id (``torch_module.get_submodule(layer.id).weight``).
A score computed on a torch weight applies to the ONNX initializer of the same shape (or its
transpose, for a MatMul exported from ``nn.Linear``); any other shape is an error naming the layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bitpass.frontend import Dataset, Layer, Model
from bitpass.frontend.errors import UsageError
from bitpass.passes.sensitivity import fisher as fisher_mod
from bitpass.passes.sensitivity.objective import objective


def _onnx_layout(layer: Layer, array: np.ndarray) -> np.ndarray:
    shape = layer.weight_shape
    if array.shape == shape:
        return array
    if array.ndim == 2 and array.T.shape == shape:
        return array.T
    raise UsageError(f"layer {layer.id!r}: the torch weight has shape {tuple(array.shape)} and the ONNX weight "
                     f"{shape}; gradient scores cannot be mapped (was the graph pruned structurally or "
                     "reshaped after export?)")


def taylor_scores(model: Model, data: Dataset, layers: list[Layer]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``{layer_id: |W * G|}`` in ONNX layout, G = sqrt(mean over samples of the squared per-sample gradient)."""
    wanted = {l.id for l in layers}
    with objective(model, data, method="gblm") as obj:
        diag, used = fisher_mod.empirical_fisher(obj.chunk_losses(1), obj.params)
        out = {}
        for layer in layers:
            i = obj.index[layer.id]
            w = obj.params[i].detach().to(torch.float64).cpu().numpy()
            g = torch.sqrt(diag[i]).cpu().numpy()
            out[layer.id] = _onnx_layout(layer, np.abs(w * g))
        info = {"samples": used, "labels": obj.label_source,
                "gradient": "root mean square of per-sample gradients"}
    assert set(out) == wanted
    return out, info


def channel_taylor(model: Model, data: Dataset, layers: list[Layer], batch_size: int = 16,
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``{layer_id: per-output-channel (sum_c w * g)^2}`` averaged over mini-batches (Molchanov et al. 2019)."""
    from bitpass.passes.pruning.common import output_axis

    with objective(model, data, method="taylor") as obj:
        sums = {l.id: None for l in layers}
        batches = 0
        for loss in obj.batch_losses(batch_size):
            grads = torch.autograd.grad(loss(), obj.params, allow_unused=True)
            batches += 1
            for layer in layers:
                i = obj.index[layer.id]
                if grads[i] is None:
                    continue
                wg = _onnx_layout(layer, (obj.params[i].detach() * grads[i]).to(torch.float64).numpy())
                axis = output_axis(layer)
                per = np.moveaxis(wg, axis, 0).reshape(wg.shape[axis], -1).sum(axis=1) ** 2
                sums[layer.id] = per if sums[layer.id] is None else sums[layer.id] + per
        out = {lid: (v if v is not None else np.zeros(1)) / max(batches, 1) for lid, v in sums.items()}
        info = {"batches": batches, "labels": obj.label_source}
    return out, info
