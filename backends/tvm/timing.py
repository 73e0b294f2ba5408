"""Whole-library timing on the host, right after building: what the artifact costs per call at each compiled
batch size, and how that time splits between bitpass's kernels and the functions TVM's default lowering made
(the Relax VM's instrument hook times every call where it runs)."""

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
    batch how that splits between bitpass's kernels, TVM's default functions and the VM's own work."""
    import tvm

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
    """Milliseconds per call in bitpass's kernels and in TVM's default functions, their call counts, and the
    rest of ``total_ms`` (the runner's median call: the VM's own work, allocation, dispatch, numpy conversions).

    Each function is timed *where it runs*, between the VM instrument's before and after hooks, over whole
    calls of the model, and the median whole call is taken: timing a function alone on warm copies of its
    arguments (what this did before) found ResNet-18's kernels 34 ms of a 53 ms call and put the other 18 ms
    on the VM, which measured in place spends 0.2 ms."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(runner.library, runner.device)
    started: dict[str, float] = {}
    per_call: list[dict[str, list[float]]] = []

    def record(func, name, before_run, ret_value, *args):
        name, now = str(name), time.perf_counter()
        if name.startswith("vm."):  # the VM's builtins: part of "vm and other"
            return 0
        if before_run:
            started[name] = now
        elif name in started:
            group = "bitpass kernels" if name.startswith(KERNEL_PREFIX) else "tvm default"
            per_call[-1].setdefault(group, []).append(now - started.pop(name))
        return 0

    vm.set_instrument(record)
    function = vm[runner.functions[batch]]
    args = [tvm.runtime.tensor(sample(spec, batch), runner.device) for spec in inputs]
    per_call.append({})
    function(*args)  # warm up
    per_call.clear()
    calls: list[float] = []
    while len(calls) < MIN_CALLS or sum(calls) < BUDGET_SECONDS and len(calls) < 50:
        per_call.append({})
        start = time.perf_counter()
        function(*args)
        calls.append(time.perf_counter() - start)
    median = sorted(range(len(calls)), key=calls.__getitem__)[len(calls) // 2]
    chosen = per_call[median]
    out: dict[str, Any] = {}
    for group in ("bitpass kernels", "tvm default"):
        times = chosen.get(group, [])
        out[f"{group} ms"] = round(sum(times) * 1e3, 4)
        out[f"{group} calls"] = len(times)
    # the rest of an uninstrumented call (the hooks themselves cost microseconds per function call)
    out["vm and other ms"] = round(max(total_ms - out["bitpass kernels ms"] - out["tvm default ms"], 0.0), 4)
    return out
