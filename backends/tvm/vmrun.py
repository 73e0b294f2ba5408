"""A tiny runner for bitpass TVM artifacts: numpy and the TVM runtime only (no bitpass), so it runs on an
edge device or under qemu-aarch64 as it is. Copied into every artifact as ``tvm_run.py``.

    python tvm_run.py ARTIFACT_DIR INPUTS.npz OUTPUTS.npz

``tvm.json`` beside ``model.so`` names the Relax VM functions per batch size and the inputs and
outputs in graph order. A batch that was not compiled is split into the largest compiled batch; the rest runs
padded to a compiled batch or as batch-1 calls, whichever the timings ``tvm.json`` records say costs less (the
models' samples are independent).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

CONFIG = "tvm.json"
LIBRARY = "model.so"


def use_all_cores():
    """Run TVM's parallel loops on every core this process may use (as many threads as TVM_NUM_THREADS says,
    where set), with no thread bound to a core.

    On x86-64 TVM's default halves the hardware thread count to skip hyper-threads; on a VM whose
    vCPUs are real cores (2 here) that left one thread and made batch-64 calls twice as slow. It also binds
    each thread to one core: on a shared machine a bound thread waits for its own core while another is free,
    and every parallel loop waits for its slowest thread (ResNet-18's convolutions at batch 1 took 1.6-1.8x
    as long bound as unbound, ``bench_tvm --only kernels`` with TVM_BIND_THREADS=1 and 0, alternating)."""
    import tvm

    os.environ.setdefault("TVM_BIND_THREADS", "0")  # read where the pool starts; the -3 mode below unbinds too
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    threads = int(os.environ.get("TVM_NUM_THREADS") or 0) or len(cpus)
    configure = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if configure is not None and threads > 1 and len(cpus) > 1:
        configure(-3, threads, [str(c) for c in cpus])  # -3: threads share all these cores, none pinned


class VmModel:
    def __init__(self, directory, device=None):
        import tvm
        from tvm import relax

        use_all_cores()
        directory = Path(directory)
        self.config = json.loads((directory / CONFIG).read_text())
        self.input_names = list(self.config["inputs"])
        self.output_names = list(self.config["outputs"])
        self.functions = {int(b): name for b, name in self.config["functions"].items()}
        self.device = device if device is not None else tvm.cpu()
        self._tensor = tvm.runtime.tensor
        self.library = tvm.runtime.load_module(str(directory / LIBRARY))
        self.vm = relax.VirtualMachine(self.library, self.device)
        self._calls = {b: self.vm[name] for b, name in self.functions.items()}
        # per-call conversions dominate small models (tvm.runtime.tensor(array) ~70 us, .numpy() ~25 us):
        # inputs are copied into preallocated tensors through writable numpy views, outputs are read
        # through a DLPack view and copied (the VM may reuse their storage on the next call)
        self._slots = {}
        self._dlpack = hasattr(np, "from_dlpack")

    def _inputs(self, arrays):
        key = tuple((a.shape, a.dtype.str) for a in arrays)
        slots = self._slots.get(key)
        if slots is None and self._dlpack:
            try:
                import tvm

                tensors = [tvm.runtime.empty(a.shape, str(a.dtype), self.device) for a in arrays]
                slots = (tensors, [np.from_dlpack(t) for t in tensors])
                if not all(v.flags.writeable for v in slots[1]):
                    slots = None
            except Exception:  # noqa: BLE001 - an old numpy or runtime: convert per call
                slots = None
            if slots is None:
                self._dlpack = False
            else:
                self._slots[key] = slots
        if slots is None:
            return [self._tensor(np.ascontiguousarray(a), self.device) for a in arrays]
        for view, a in zip(slots[1], arrays):
            view[...] = a
        return slots[0]

    def _output(self, tensor):
        if self._dlpack:
            try:
                return np.from_dlpack(tensor).copy()
            except Exception:  # noqa: BLE001
                pass
        return tensor.numpy()

    def _call(self, batch, arrays):
        result = self._calls[batch](*self._inputs(arrays))
        if hasattr(result, "numpy"):
            return [self._output(result)]
        return [self._output(r) for r in result]

    def padded_to(self, size):
        """The compiled batch that ``size`` samples (not a compiled batch) run padded to, or None to run them as
        batch-1 calls: whichever costs less by the per-call times ``tvm.json`` records from compile time on the
        host (ResNet-18 fp32: a batch-64 call takes 53 batch-1 calls' time, so 8 samples padded to 64 took 8x as
        long as 8 calls); without them (an artifact built for another target), pad where padding is less than
        half the call."""
        target = min((b for b in self._calls if b >= size), default=max(self._calls))
        if 1 not in self._calls:
            return target
        timing = self.config.get("host_timing") or {}
        one, padded = timing.get("batch_1_ms"), timing.get(f"batch_{target}_ms")
        if one and padded:
            return target if padded < size * one else None
        return target if 2 * size > target else None

    def run(self, feeds):
        arrays = [np.asarray(feeds[n]) for n in self.input_names]
        batch = int(arrays[0].shape[0])
        if batch in self._calls:
            return self._call(batch, arrays)
        big = max(self._calls)
        parts = []
        start = 0
        while start < batch:
            size = min(big, batch - start)
            chunk = [a[start:start + size] for a in arrays]
            target = size if size in self._calls else self.padded_to(size)
            if target is None:
                parts.extend(self._call(1, [a[i:i + 1] for a in chunk]) for i in range(size))
            elif target == size:
                parts.append(self._call(size, chunk))
            else:
                padded = [np.concatenate([a, np.repeat(a[-1:], target - size, axis=0)]) for a in chunk]
                parts.append([o[:size] for o in self._call(target, padded)])
            start += size
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    model = VmModel(argv[0])
    with np.load(argv[1]) as data:
        feeds = {n: data[n] for n in model.input_names}
    outputs = model.run(feeds)
    np.savez(argv[2], **dict(zip(model.output_names, outputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
