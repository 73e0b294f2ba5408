"""``synthesize-data``: data-free calibration samples from batch-norm statistics (ZeroQ).

Random inputs are optimised so that, at every BatchNorm layer of ``model.torch_module``, the
batch mean and standard deviation of the layer's input match the running mean and standard
deviation stored in the layer (ZeroQ's "distilled data"). The result becomes the context's
calibration data, so sensitivity and calibration passes can run without any real samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic
import torch

from bitpass.frontend import Model, from_arrays
from bitpass.frontend.errors import UsageError
from bitpass.passes.infra import DATA_CALIBRATION, PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult

_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


@dataclass
class Distilled:
    """Synthesised inputs and how well they match the BatchNorm statistics."""

    inputs: np.ndarray
    initial_loss: float
    final_loss: float
    iterations: int
    batch_norms: int


def batch_norm_layers(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """BatchNorm modules that track running statistics."""
    return [m for m in module.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


def bn_statistics_loss(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's loss: sum over BatchNorm layers of ||mu_batch - mu_running||_2 + ||sigma_batch - sigma_running||_2."""
    layers = batch_norm_layers(module)
    terms: list[torch.Tensor] = []

    def hook(bn: torch.nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...]) -> None:
        h = args[0]
        dims = [d for d in range(h.dim()) if d != 1]
        mean = h.mean(dim=dims)
        std = torch.sqrt(h.var(dim=dims, unbiased=False) + bn.eps)
        terms.append(torch.linalg.vector_norm(mean - bn.running_mean)
                     + torch.linalg.vector_norm(std - torch.sqrt(bn.running_var + bn.eps)))

    handles = [bn.register_forward_pre_hook(hook) for bn in layers]
    try:
        module(x)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(terms).sum() if terms else torch.zeros(())


def distill(module: torch.nn.Module, shape: tuple[int, ...], *, iterations: int = 100, lr: float = 0.2,
            seed: int = 0, dtype: torch.dtype = torch.float32,
            progress: Callable[[str], None] | None = None) -> Distilled:
    """Optimise N(0, 1) inputs of ``shape`` with Adam (cosine-annealed ``lr``) so their BatchNorm statistics
    match the running ones."""
    if not batch_norm_layers(module):
        raise UsageError("synthesize-data needs a model with BatchNorm layers (ZeroQ matches their running "
                         "statistics); this model has none: give calibration data instead")
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations))
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            initial = final = float("nan")
            for step in range(iterations):
                optimizer.zero_grad(set_to_none=True)
                loss = bn_statistics_loss(module, x)
                if step == 0:
                    initial = float(loss.detach())
                loss.backward()
                optimizer.step()
                schedule.step()
                if progress is not None and (step + 1) % 50 == 0:
                    progress(f"synthesize-data: step {step + 1}/{iterations}, BN loss {float(loss.detach()):.4g}")
            with torch.no_grad():
                final = float(bn_statistics_loss(module, x))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)
    return Distilled(x.detach().cpu().numpy(), initial, final, iterations, len(batch_norm_layers(module)))


class SynthesizeDataConfig(PassConfig):
    samples: int = pydantic.Field(64, ge=2)
    iterations: int = pydantic.Field(100, ge=1)
    lr: float = pydantic.Field(0.2, gt=0)
    #: replace calibration data that was given (by default it is kept and nothing is synthesised)
    replace: bool = False


class SynthesizeData(Pass):
    """Synthesise calibration inputs whose BatchNorm statistics match the model's (ZeroQ, data-free)."""

    name = "synthesize-data"
    Config = SynthesizeDataConfig
    requires = frozenset()
    produces = frozenset({DATA_CALIBRATION})
    config: SynthesizeDataConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        if ctx.calibration is not None and not cfg.replace:
            ctx.records["synthesize-data"] = {"skipped": "calibration data was given", "source":
                                              ctx.calibration.source}
            ctx.progress("synthesize-data: calibration data was given; keeping it (replace=true to override)")
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        module = model.torch_module
        if module is None:
            raise UsageError("synthesize-data needs the torch module the model came from (ZeroQ optimises inputs "
                             "through its BatchNorm layers); this model was imported from ONNX: give calibration "
                             "data (--calib FILE)")
        specs = model.inputs
        if len(specs) != 1:
            raise UsageError(f"synthesize-data handles models with one input; this one has {len(specs)}: "
                             f"{', '.join(s.name for s in specs)}")
        spec = specs[0]
        if spec.dtype.kind != "f":
            raise UsageError(f"synthesize-data needs a floating-point input; {spec.describe()} is not")
        if spec.shape is None or not all(isinstance(d, int) for d in spec.shape[1:]):
            raise UsageError(f"synthesize-data needs the input's shape past the batch axis; {spec.describe()} "
                             "has unknown dimensions")
        shape = (cfg.samples, *(int(d) for d in spec.shape[1:]))  # type: ignore[arg-type]
        start = time.perf_counter()
        result = distill(module, shape, iterations=cfg.iterations, lr=cfg.lr, seed=ctx.seed,
                         dtype=getattr(torch, str(spec.dtype)), progress=ctx.progress)
        ctx.calibration = from_arrays({spec.name: result.inputs.astype(spec.dtype)}, specs, source="zeroq")
        seconds = round(time.perf_counter() - start, 3)
        ctx.records["synthesize-data"] = {
            "method": "zeroq", "samples": cfg.samples, "iterations": result.iterations, "lr": cfg.lr,
            "batch_norms": result.batch_norms, "initial_bn_loss": result.initial_loss,
            "final_bn_loss": result.final_loss, "seconds": seconds, "data_sha256": ctx.calibration.sha256,
            "seed": ctx.seed,
        }
        ctx.progress(f"synthesize-data: {cfg.samples} samples, BN loss {result.initial_loss:.4g} -> "
                     f"{result.final_loss:.4g} in {seconds:.2f} s")
        return PassResult(model, modified=False, preserved=PRESERVE_ALL)
