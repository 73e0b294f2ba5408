"""Whole-library timing on the host, right after building: what the artifact costs per call at each compiled
batch size, and how that time splits between bitpass's kernels and the functions TVM's default lowering made
(the Relax VM's instrument hook times every call)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bitpass.frontend import TensorSpec

#: PrimFuncs the lowering emitted for bitpass's kernels are named with this prefix (``lower.py``)
KERNEL_PREFIX = "bitpass_"
#: seconds of calls per measurement (at least ``MIN_CALLS``), so small models are timed as well as big ones
BUDGET_SECONDS = 0.3
MIN_CALLS = 3


def sample(spec: TensorSpec, batch: int, seed: int = 0) -> np.ndarray:
    """An input of ``spec``'s shape with the leading symbolic dimension ``batch``: normal floats, zero
    integers (valid token ids and indices for any table)."""
    shape = [batch if i == 0 and not isinstance(d, int) else int(d) if isinstance(d, int) else 1
             for i, d in enumerate(spec.shape or ())]
    if np.issubdtype(spec.dtype, np.floating):
        return np.random.default_rng(seed).standard_normal(shape).astype(spec.dtype)
    return np.zeros(shape, spec.dtype)


def _median_seconds(fn) -> float:
    fn()
    times: list[float] = []
    while len(times) < MIN_CALLS or sum(times) < BUDGET_SECONDS and len(times) < 50:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(directory: Path, inputs: Sequence[TensorSpec], batches: Sequence[int]) -> dict[str, Any]:
    """Median milliseconds per call at each batch size through the artifact's own runner, and at the first
    batch how that splits: every function the VM calls is recorded once (the VM's instrument hook hands over
    the function and its arguments), then timed alone on copies of its arguments; the time neither
    bitpass's kernels nor TVM's default functions account for is the VM's own (allocation, dispatch)."""
    import tvm
    from tvm import relax

    from bitpass.backends.tvm.vmrun import VmModel

    runner = VmModel(directory)
    result: dict[str, Any] = {"threads": int(tvm.get_global_func("runtime.NumThreads")())}
    for batch in batches:
        feeds = {spec.name: sample(spec, batch) for spec in inputs}
        result[f"batch_{batch}_ms"] = round(_median_seconds(lambda: runner.run(feeds)) * 1e3, 4)
    first = batches[0]
    result[f"batch_{first}_split"] = split(runner, inputs, first, result[f"batch_{first}_ms"])
    return result


def split(runner, inputs: Sequence[TensorSpec], batch: int, total_ms: float) -> dict[str, Any]:
    """Milliseconds per call in bitpass's kernels and in TVM's default functions (each call timed alone),
    their call counts, and the rest of ``total_ms`` (the VM's own work)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(runner.library, runner.device)
    calls: list[tuple[str, Any, list[Any]]] = []

    def record(func, name, before_run, ret_value, *args):
        if before_run and not str(name).startswith("vm."):
            # copies of the values as they are now (indices must stay in range); outputs are rewritten
            copies = [tvm.runtime.tensor(a.numpy(), runner.device) if isinstance(a, tvm.runtime.Tensor) else a
                      for a in args]
            calls.append((str(name), func, copies))
        return 0

    vm.set_instrument(record)
    vm[runner.functions[batch]](*[tvm.runtime.tensor(sample(spec, batch), runner.device) for spec in inputs])
    groups = {"bitpass kernels": [0.0, 0], "tvm default": [0.0, 0]}
    for name, func, args in calls:
        group = groups["bitpass kernels" if name.startswith(KERNEL_PREFIX) else "tvm default"]
        func(*args)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            func(*args)
            best = min(best, time.perf_counter() - start)
        group[0] += best * 1e3
        group[1] += 1
    out: dict[str, Any] = {f"{g} ms": round(ms, 4) for g, (ms, _) in groups.items()}
    out.update({f"{g} calls": n for g, (_, n) in groups.items()})
    out["vm and other ms"] = round(max(total_ms - sum(ms for ms, _ in groups.values()), 0.0), 4)
    return out
