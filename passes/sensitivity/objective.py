"""The loss the gradient-based methods differentiate: the torch module behind a Model, on calibration data.

Finds each quantizable layer's weight tensor in ``model.torch_module``, builds loss closures
over the calibration samples (cross-entropy on the labels, or on the fp32 model's own
argmax when there are none), and puts the module into eval mode with gradients enabled only
for those weights while in use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bitpass.frontend import Dataset, Layer, Model
from bitpass.frontend.errors import UsageError
from bitpass.passes.sensitivity.quant import layer_channel_axis, torch_channel_axis

GRADIENT_METHODS = ("hutchinson", "eigenvalue", "fisher", "taylor")
ORT_METHODS = ("output-kl", "output-mse")

LossFn = Callable[[], torch.Tensor]


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UsageError(f"the torch module returned {type(out).__name__}; gradient sensitivity needs a tensor "
                     "of logits as (first) output")


@dataclass
class Objective:
    """Weights per layer and loss closures over the calibration samples."""

    module: torch.nn.Module
    layer_ids: list[str]
    #: unique weight tensors; ``index[layer_id]`` says which one belongs to a layer
    params: list[torch.Tensor]
    index: dict[str, int]
    #: output-channel axis of each unique weight (for fake quantization)
    axes: list[int]
    inputs: list[torch.Tensor]
    targets: torch.Tensor
    #: "labels" or "pseudo-labels (fp32 argmax)"
    label_source: str

    def __len__(self) -> int:
        return len(self.targets)

    def _loss(self, lo: int, hi: int, scale: float) -> torch.Tensor:
        logits = _first_tensor(self.module(*(x[lo:hi] for x in self.inputs)))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 self.targets[lo:hi].reshape(-1), reduction="sum")
        return loss * scale

    def batch_losses(self, batch_size: int) -> list[LossFn]:
        """Closures whose values **sum** to the mean cross-entropy over all samples."""
        n = len(self)
        positions = max(1, self.targets[:1].numel())
        scale = 1.0 / (n * positions)
        return [lambda lo=lo: self._loss(lo, min(lo + batch_size, n), scale) for lo in range(0, n, max(1, batch_size))]

    def chunk_losses(self, chunk: int = 1) -> Iterator[LossFn]:
        """One closure per ``chunk`` samples, each the **mean** cross-entropy of its chunk (for the Fisher)."""
        n = len(self)
        positions = max(1, self.targets[:1].numel())
        for lo in range(0, n, max(1, chunk)):
            hi = min(lo + chunk, n)
            yield lambda lo=lo, hi=hi: self._loss(lo, hi, 1.0 / ((hi - lo) * positions))

    def weight_arrays(self) -> list[np.ndarray]:
        return [p.detach().cpu().numpy() for p in self.params]


def _find_weight(module: torch.nn.Module, layer: Layer,
                 named: dict[str, torch.nn.Parameter]) -> tuple[torch.Tensor, int]:
    layer_id, weight_name = layer.id, layer.weight.name
    try:
        sub = module.get_submodule(layer_id)
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight, torch_channel_axis(sub)
    except AttributeError:
        pass
    for name in (f"{layer_id}.weight", weight_name):
        if name and name in named:
            weight = named[name]
            same = tuple(weight.shape) == layer.weight_shape
            return weight, layer_channel_axis(layer) if same else 0
    raise UsageError(f"layer {layer_id!r} has no weight in the model's torch module (a torch export names "
                     "layers by module path); gradient sensitivity needs the module the model was exported "
                     f"from: use one of {', '.join(ORT_METHODS)}, which need only ONNX Runtime")


@contextlib.contextmanager
def objective(model: Model, data: Dataset, *, samples: int | None = None,
              method: str = "gradient") -> Iterator[Objective]:
    """An ``Objective`` for ``model`` on (the first ``samples`` of) ``data``; restores the module on exit."""
    module = model.torch_module
    if module is None:
        raise UsageError(f"sensitivity method {method!r} needs the torch module the model came from, and this "
                         f"model was imported from ONNX; methods available for it: {', '.join(ORT_METHODS)}")
    if samples and samples < len(data):
        data = data.head(samples)
    layers = model.layers()
    named = dict(module.named_parameters())
    params: list[torch.Tensor] = []
    axes: list[int] = []
    index: dict[str, int] = {}
    for layer in layers:
        weight, axis = _find_weight(module, layer, named)
        for i, p in enumerate(params):
            if p is weight:
                index[layer.id] = i
                break
        else:
            index[layer.id] = len(params)
            params.append(weight)
            axes.append(axis)
    all_params = list(module.parameters())
    flags = [p.requires_grad for p in all_params]
    was_training = module.training
    try:
        module.eval()
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        inputs = [torch.from_numpy(np.ascontiguousarray(data.inputs[spec.name])) for spec in model.inputs]
        with torch.no_grad():
            logits = _first_tensor(module(*inputs))
        if data.labels is not None:
            targets = torch.from_numpy(np.asarray(data.labels)).long()
            if tuple(targets.shape) != tuple(logits.shape[:-1]):
                raise UsageError(f"calibration labels have shape {tuple(targets.shape)}, but the model's logits "
                                 f"{tuple(logits.shape)} need {tuple(logits.shape[:-1])}")
            source = "labels"
        else:
            targets = logits.argmax(dim=-1)
            source = "pseudo-labels (fp32 argmax)"
        with torch.enable_grad():
            yield Objective(module, [l.id for l in layers], params, index, axes, inputs, targets, source)
    finally:
        for p, flag in zip(all_params, flags):
            p.requires_grad_(flag)
        module.train(was_training)
