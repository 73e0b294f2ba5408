"""Empirical Fisher (squared gradients) and the second-order Taylor estimate of quantization loss.

Plain torch in, plain numbers out, so each function can be checked on a problem whose
answer is known in closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

LossFn = Callable[[], torch.Tensor]


def empirical_fisher(losses: Iterable[LossFn], params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """The diagonal empirical Fisher: the **mean** over closures of the elementwise squared gradient.

    Give one closure per sample (each returning that sample's loss) for the textbook
    empirical Fisher ``F = 1/N sum_n (d loss_n / d w)^2``; one closure per mini-batch gives the
    cheaper batch-gradient version (which adds the squared mean gradient and shrinks the
    per-sample part by the batch size). Returns ``(diagonals, closures used)``.
    """
    params = list(params)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = 0
    for loss in losses:
        grads = torch.autograd.grad(loss(), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += g.detach().to(torch.float64) ** 2
        count += 1
    if count == 0:
        raise ValueError("empirical_fisher needs at least one loss closure")
    return [t / count for t in total], count


def fisher_scores(diagonals: Sequence[torch.Tensor]) -> list[float]:
    """Per-block sensitivity from the Fisher diagonal: its mean, Tr(F_l) / numel (cf. HAWQ-V2's average trace)."""
    return [float(d.mean()) for d in diagonals]


def taylor_delta_loss(curvature: np.ndarray | torch.Tensor, delta: np.ndarray | torch.Tensor) -> float:
    """Second-order loss change ``0.5 * sum_j c_j * delta_j^2`` for a weight perturbation ``delta``.

    ``curvature`` is a diagonal curvature (the empirical Fisher, or a Hessian diagonal) of the
    same shape; the first-order term is dropped because the model is assumed trained (gradient
    ~ 0). For the exact quadratic term with the full block Hessian see
    ``hessian.block_quadratic_forms``.
    """
    c = curvature.detach().cpu().numpy() if isinstance(curvature, torch.Tensor) else np.asarray(curvature)
    d = delta.detach().cpu().numpy() if isinstance(delta, torch.Tensor) else np.asarray(delta)
    if c.shape != d.shape:
        raise ValueError(f"curvature {c.shape} and delta {d.shape} differ in shape")
    return 0.5 * float(np.sum(c.astype(np.float64) * d.astype(np.float64) ** 2))


def perturbation_table(score: float, weight: np.ndarray, bits: Iterable[int], axis: int | None = 0) -> dict[int, float]:
    """HAWQ-V2's Omega(l, b) = 0.5 * score * ||Q_b(W) - W||^2 for each bit width (score: average curvature)."""
    from bitpass.passes.sensitivity.quant import quantization_error

    return {int(b): 0.5 * float(score) * quantization_error(weight, int(b), axis) for b in bits}
