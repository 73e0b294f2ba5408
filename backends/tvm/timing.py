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
    batch the share of VM time in bitpass kernels, TVM's default functions and the VM's builtins."""
    import tvm
    from tvm import relax

    from bitpass.backends.tvm.vmrun import VmModel

    runner = VmModel(directory)
    result: dict[str, Any] = {"threads": int(tvm.get_global_func("runtime.NumThreads")())}
    for batch in batches:
        feeds = {spec.name: sample(spec, batch) for spec in inputs}
        result[f"batch_{batch}_ms"] = round(_median_seconds(lambda: runner.run(feeds)) * 1e3, 4)
    vm = relax.VirtualMachine(runner.library, runner.device)
    seconds: dict[str, float] = {"bitpass kernels": 0.0, "tvm default": 0.0, "vm builtins": 0.0}
    started: dict[str, float] = {}

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            started[name] = time.perf_counter()
        elif name in started:
            group = "bitpass kernels" if name.startswith(KERNEL_PREFIX) else \
                "vm builtins" if name.startswith("vm.") else "tvm default"
            seconds[group] += time.perf_counter() - started.pop(name)
        return 0

    first = batches[0]
    function = runner.functions[first]
    args = [tvm.runtime.tensor(sample(spec, first), runner.device) for spec in inputs]
    vm[function](*args)
    vm.set_instrument(instrument)
    calls = 0
    start = time.perf_counter()
    while calls < MIN_CALLS or time.perf_counter() - start < BUDGET_SECONDS and calls < 50:
        vm[function](*args)
        calls += 1
    result[f"batch_{first}_split_ms"] = {group: round(s / calls * 1e3, 4) for group, s in seconds.items()}
    return result
