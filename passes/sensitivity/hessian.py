"""Hessian curvature per parameter block, from Hessian-vector products (HAWQ, HAWQ-V2).

Everything here takes plain torch objects: ``losses``, one closure or a sequence of
closures each returning a scalar tensor (the loss is the **sum** of their values, so a
pass splits a data set into batches whose closures return ``batch_loss_sum / N``), and
``params``, a list of leaf tensors with ``requires_grad``. Block ``l`` of the Hessian is
the second derivative with respect to ``params[l]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

LossFn = Callable[[], torch.Tensor]


def _closures(losses: LossFn | Sequence[LossFn]) -> list[LossFn]:
    return [losses] if callable(losses) else list(losses)


class HessianOperator:
    """Hessian-vector products of ``sum(loss() for loss in losses)`` with respect to ``params``.

    With ``keep_graph`` (the default) each closure's first-order gradient graph is built once
    and reused by every product (memory: one autograd graph per closure); without it every
    product recomputes the gradients.
    """

    def __init__(self, losses: LossFn | Sequence[LossFn], params: Sequence[torch.Tensor], *,
                 keep_graph: bool = True) -> None:
        self.losses = _closures(losses)
        self.params = list(params)
        if not self.params:
            raise ValueError("HessianOperator needs at least one parameter tensor")
        for p in self.params:
            if not p.requires_grad:
                raise ValueError("every parameter must have requires_grad=True")
        self.keep_graph = keep_graph
        self._grads: list[list[torch.Tensor]] | None = None
        #: Hessian-vector products computed so far (one per closure and block product counts once)
        self.products = 0

    def _first_order(self) -> list[list[torch.Tensor]]:
        if self._grads is not None:
            return self._grads
        grads = []
        for loss in self.losses:
            value = loss()
            grads.append(list(torch.autograd.grad(value, self.params, create_graph=True)))
        if self.keep_graph:
            self._grads = grads
        return grads

    def gradient(self) -> list[torch.Tensor]:
        """The gradient of the total loss (detached)."""
        total = [torch.zeros_like(p) for p in self.params]
        for grads in self._first_order():
            for t, g in zip(total, grads):
                t += g.detach()
        return total

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` for the full Hessian (all blocks, cross terms included)."""
        out = [torch.zeros_like(p) for p in self.params]
        for grads in self._first_order():
            dot = sum((g * v).sum() for g, v in zip(grads, vectors))
            hv = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o += h
        self.products += 1
        return out

    def block_hvp(self, vectors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``H_ll v_l`` for each block ``l`` whose vector is not None (the block-diagonal part only)."""
        out: list[torch.Tensor | None] = [None if v is None else torch.zeros_like(p)
                                          for p, v in zip(self.params, vectors)]
        for grads in self._first_order():
            for index, (g, v) in enumerate(zip(grads, vectors)):
                if v is None:
                    continue
                (h,) = torch.autograd.grad((g * v).sum(), self.params[index], retain_graph=True,
                                           allow_unused=True)
                if h is not None:
                    out[index] += h  # type: ignore[operator]
        self.products += 1
        return out


def rademacher_like(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor of independent +-1 entries shaped like ``p``."""
    bits = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8, device=p.device)
    return bits.to(p.dtype) * 2 - 1


@dataclass
class TraceEstimate:
    """Hutchinson estimates per block: ``trace[l]`` estimates Tr(H_ll); ``average[l] = trace[l] / numel``."""

    trace: list[float]
    stderr: list[float]
    average: list[float]
    samples: int
    converged: bool
    #: why sampling stopped, in words
    reason: str
    #: Kendall tau between the block ranking (by average trace) now and ``window`` samples ago
    kendall_tau: float
    #: running mean of the average trace after each sample (for plots and tests)
    history: list[list[float]] = field(default_factory=list)


def _kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    if n < 2:
        return 1.0
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = (a[i] - a[j]) * (b[i] - b[j])
            if s > 0:
                concordant += 1
            elif s < 0:
                discordant += 1
    pairs = n * (n - 1) / 2
    return (concordant - discordant) / pairs


def _order(values: Sequence[float]) -> tuple[int, ...]:
    return tuple(sorted(range(len(values)), key=lambda i: values[i]))


def _resolved(mean: Sequence[float], stderr: Sequence[float], sizes: Sequence[int], tolerance: float,
              z: float) -> bool:
    """Every pair of neighbours in the ranking is either ``z`` combined standard errors apart, or
    both estimates are within ``tolerance`` relative standard error (a near-tie whose order does
    not matter)."""
    average = [m / n for m, n in zip(mean, sizes)]
    se = [s / n for s, n in zip(stderr, sizes)]
    precise = [s <= tolerance * abs(a) for s, a in zip(se, average)]
    order = _order(average)
    for lo, hi in zip(order, order[1:]):
        gap = average[hi] - average[lo]
        if gap < z * math.hypot(se[lo], se[hi]) and not (precise[lo] and precise[hi]):
            return False
    return True


def hutchinson_trace(losses: LossFn | Sequence[LossFn] | HessianOperator, params: Sequence[torch.Tensor] = (),
                     *, tolerance: float = 0.1, max_samples: int = 100, min_samples: int = 8, window: int = 5,
                     z: float = 2.0, block_diagonal: bool = True, generator: torch.Generator | None = None,
                     progress: Callable[[str], None] | None = None) -> TraceEstimate:
    """Tr(H_ll) per block by Hutchinson's estimator E[v^T H v] with Rademacher ``v`` (HAWQ-V2).

    Each sample draws a Rademacher ``v_l`` for every block. With ``block_diagonal`` (default) it
    computes ``v_l . H_ll v_l`` by one block product per block: no cross-block terms, so a lower
    variance (about 2x-7x lower standard deviation on the digits CNN) at the price of one
    backward pass per block. Without it one full product ``H v`` serves all blocks, as in
    HAWQ-V2, and ``v_l . (Hv)_l`` is still unbiased (cross terms have mean zero) but noisier.

    Sampling stops adaptively, after at least ``max(min_samples, window + 1)`` samples, when

    * the ranking of the blocks by average trace (Tr / numel) has not changed over the last
      ``window`` samples, and
    * the ranking is resolved: each pair of neighbours in it is ``z`` combined standard errors
      apart, or both have relative standard error ``<= tolerance`` (a near-tie);

    or after ``max_samples`` (then ``converged`` is False).
    """
    op = losses if isinstance(losses, HessianOperator) else HessianOperator(losses, params)
    sizes = [p.numel() for p in op.params]
    count = len(op.params)
    total = [0.0] * count
    total_sq = [0.0] * count
    history: list[list[float]] = []
    orders: list[tuple[int, ...]] = []
    samples, converged, reason, tau = 0, False, f"reached max_samples={max_samples}", 1.0
    stderr = [math.inf] * count
    while samples < max_samples:
        vs = [rademacher_like(p, generator) for p in op.params]
        hv = op.block_hvp(vs) if block_diagonal else op.hvp(vs)
        samples += 1
        for index, (v, h) in enumerate(zip(vs, hv)):
            sample = float((v * h).sum())  # type: ignore[operator]
            total[index] += sample
            total_sq[index] += sample * sample
        mean = [t / samples for t in total]
        average = [m / n for m, n in zip(mean, sizes)]
        history.append(average)
        orders.append(_order(average))
        if samples >= 2:
            stderr = [math.sqrt(max(sq / samples - m * m, 0.0) / (samples - 1)) for sq, m in zip(total_sq, mean)]
        if progress is not None and samples % 5 == 0:
            worst = max(s / abs(m) if m else math.inf for s, m in zip(stderr, mean))
            progress(f"hutchinson: {samples} samples, worst relative stderr {worst:.3f}")
        if samples >= max(min_samples, window + 1):
            stable = all(o == orders[-1] for o in orders[-1 - window:])
            if stable and _resolved(mean, stderr, sizes, tolerance, z):
                converged = True
                reason = (f"ranking unchanged over the last {window} samples and resolved (neighbours "
                          f"{z:g} stderr apart or within {tolerance:g} relative stderr) after {samples} samples")
                break
    mean = [t / max(samples, 1) for t in total]
    if len(history) > window:
        tau = _kendall_tau(history[-1], history[-1 - window])
    return TraceEstimate(trace=mean, stderr=stderr, average=[m / n for m, n in zip(mean, sizes)],
                         samples=samples, converged=converged, reason=reason, kendall_tau=tau, history=history)


@dataclass
class EigenEstimate:
    """Top eigenvalue of each Hessian block by power iteration."""

    eigenvalue: list[float]
    iterations: list[int]
    converged: list[bool]
    products: int


def top_eigenvalues(losses: LossFn | Sequence[LossFn] | HessianOperator, params: Sequence[torch.Tensor] = (),
                    *, tolerance: float = 1e-3, max_iterations: int = 100,
                    generator: torch.Generator | None = None) -> EigenEstimate:
    """The dominant eigenvalue of every block H_ll by power iteration (HAWQ), all blocks in step.

    Each iteration does one block-diagonal product ``H_ll v_l`` for the blocks still running;
    the estimate is the Rayleigh quotient ``v_l . H_ll v_l`` with ``|v_l| = 1``, and a block
    stops when it changes by at most ``tolerance`` relative to its magnitude. Power iteration
    finds the eigenvalue of largest magnitude (the top one for a positive semi-definite block).
    """
    op = losses if isinstance(losses, HessianOperator) else HessianOperator(losses, params)
    vs: list[torch.Tensor | None] = []
    for p in op.params:
        v = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        vs.append(v / v.norm())
    count = len(op.params)
    eig = [math.nan] * count
    iterations = [0] * count
    done = [False] * count
    start = op.products
    for _ in range(max_iterations):
        active: list[torch.Tensor | None] = [None if done[i] else vs[i] for i in range(count)]
        if all(a is None for a in active):
            break
        hv = op.block_hvp(active)
        for i in range(count):
            if done[i]:
                continue
            h = hv[i]
            assert h is not None and vs[i] is not None
            value = float((vs[i] * h).sum())  # type: ignore[operator]
            iterations[i] += 1
            norm = float(h.norm())
            if norm == 0.0:
                eig[i], done[i] = 0.0, True
                continue
            previous = eig[i]
            eig[i] = value
            vs[i] = h / norm
            if not math.isnan(previous) and abs(value - previous) <= tolerance * max(abs(value), 1e-30):
                done[i] = True
    return EigenEstimate(eig, iterations, list(done), op.products - start)


def block_quadratic_forms(op: HessianOperator, deltas: Sequence[torch.Tensor | None]) -> list[float | None]:
    """``delta_l^T H_ll delta_l`` for each block with a perturbation (one block product for all)."""
    hv = op.block_hvp(deltas)
    return [None if d is None or h is None else float((d * h).sum()) for d, h in zip(deltas, hv)]
