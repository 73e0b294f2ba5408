"""Layer-local calibration in torch: each linear layer's input Hessian, and writing rounded weights back.

Layer ids are module paths (``bitpass.frontend.decoder.export_decoder`` names ONNX layers the same way).
Two weight layouts exist among transformers' linear layers: ``nn.Linear`` keeps ``(out, in)``, GPT-2's
``Conv1D`` keeps ``(in, out)``. ``weight_matrix`` / ``set_weight_matrix`` hide the difference and always
speak the MatMul layout ``(K, N) = (in, out)``; a per-output-channel axis is 1 there (0 of the torch
weight for ``nn.Linear``, 1 for ``Conv1D``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bitpass.passes.weight_only.gptq import HessianAccumulator


def is_conv1d(module: Any) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", -1), getattr(module, "nf", -1)))


def output_channel_axis(module: Any) -> int:
    """The axis of the torch weight that indexes output channels: 1 for ``Conv1D``, 0 otherwise."""
    return 1 if is_conv1d(module) else 0


def weight_matrix(module: Any) -> np.ndarray:
    """The layer's weight as a MatMul's ``(K, N)`` float32 matrix."""
    weight = module.weight.detach().cpu().float().numpy()
    return np.ascontiguousarray(weight if is_conv1d(module) else weight.T)


def set_weight_matrix(module: Any, matrix: np.ndarray) -> None:
    """Write a ``(K, N)`` matrix into the layer's weight (in place, its own layout)."""
    import torch

    value = torch.from_numpy(np.ascontiguousarray(matrix if is_conv1d(module) else np.asarray(matrix).T))
    if tuple(value.shape) != tuple(module.weight.shape):
        raise ValueError(f"a {matrix.shape} matrix does not fit a weight of shape {tuple(module.weight.shape)}")
    with torch.no_grad():
        module.weight.copy_(value.to(module.weight.dtype))


def untie_output_embedding(lm: Any) -> None:
    """Give ``lm_head`` its own copy of a tied embedding table, so rounding it leaves the embedding alone
    (as in the exported graph, where the lookup and the output projection are separate tensors)."""
    import torch

    head = lm.get_output_embeddings()
    embedding = lm.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        if hasattr(lm.config, "tie_word_embeddings"):
            lm.config.tie_word_embeddings = False


def linear_layer_ids(lm: Any) -> list[str]:
    """Module paths of the LM's linear layers (``nn.Linear`` and ``Conv1D``), in registration order."""
    import torch

    return [name for name, module in lm.named_modules()
            if isinstance(module, torch.nn.Linear) or is_conv1d(module)]


def layer_hessians(lm: Any, layer_ids: Sequence[str], windows: Iterable[np.ndarray] | np.ndarray, *,
                   batch: int = 16) -> dict[str, np.ndarray]:
    """``X^T X / n`` of each named layer's inputs over calibration token windows ``(count, length)``,
    all layers in one pass of the full-precision model (the layer-local objectives GPTQ and SliM-LLM use)."""
    import torch

    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    for layer_id in layer_ids:
        module = lm.get_submodule(layer_id)
        accumulators[layer_id] = HessianAccumulator(weight_matrix(module).shape[0])

        def hook(_module: Any, inputs: tuple[Any, ...], layer_id: str = layer_id) -> None:
            accumulators[layer_id].add(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().numpy())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        windows = np.asarray(windows, np.int64)
        with torch.no_grad():
            for start in range(0, len(windows), batch):
                lm(input_ids=torch.from_numpy(windows[start:start + batch]))
    finally:
        for handle in handles:
            handle.remove()
    return {layer_id: accumulator.value for layer_id, accumulator in accumulators.items()}
