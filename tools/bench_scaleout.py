"""Scale-out: the sensitivity pass of a GPT-2 on one process, on 2 local worker processes and on a local Ray cluster.

    python -m bitpass.tools.bench_scaleout                    # GPT-2 small (124 M): serial / local:2 / ray
    python -m bitpass.tools.bench_scaleout --quick            # a 4-layer, 256-wide GPT-2: about 1-2 min
    python -m bitpass.tools.bench_scaleout --step quantize-weights   # GPTQ at 3.5 average bits instead

``--step sensitivity`` (default) times the ``sensitivity`` pass with ``method=output-kl`` (the per-layer,
per-width output KL runs in ONNX Runtime, each over only the nodes downstream of the layer's weight) on the
decoder graph ``compile`` imports (KV cache included), with the time budget off so every executor does the
same work: ``--windows`` x ``--length`` token windows, widths 2 and 4 measured, 8 scaled. A worker builds its
own probe (one reference run) from the model and batches written once to a temporary folder; ORT's threads
are split between the workers. ``--step quantize-weights`` times ``quantize_weights`` (GPTQ, mixed 2/4/8-bit
groups at 3.5 average bits: slice errors, then rounding, per layer; the layer-input Hessians, one ORT run in
the parent, are timed apart).

Printed: the CPU line, then per executor the wall seconds of the step, its speed-up over serial, whether the
result is the serial one bit for bit (the sensitivity table; the written model), the peak resident memory of
this process (so far in the run) and the largest summed memory of its descendants (worker processes; Ray's raylet,
object store and workers), sampled from /proc.
Ray's start-up (``ray.init``) is timed apart, outside the step. A 2-core machine can at best halve the step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the --quick model: GPT-2's shape at a fraction of its size (about 3.5 M weights, 17 layers)
QUICK = {"vocab_size": 4096, "n_embd": 256, "n_layer": 4, "n_head": 4}


def _model(size: str, quick: bool) -> tuple[Any, Any, str]:
    from bitpass.frontend.decoder import export_decoder
    from bitpass.tools import decoders

    if quick:
        lm = decoders.tiny_gpt2(vocab=QUICK["vocab_size"], width=QUICK["n_embd"], layers=QUICK["n_layer"],
                                heads=QUICK["n_head"])
        name = "gpt2-quick"
    else:
        lm = decoders.tiny_gpt2(width=64) if size == "tiny" else decoders.gpt2_sized(size)
        name = f"gpt2-{size}"
    model, spec = export_decoder(lm, name=name)
    return model, spec, name


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


class DescendantMemory:
    """The largest summed resident memory of this process's descendants (worker processes, Ray's raylet and
    workers), sampled from /proc every ``interval`` seconds while the block runs."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> DescendantMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval):
            parents: dict[int, int] = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        stat = Path(f"/proc/{entry}/stat").read_text()
                        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
                    except (OSError, ValueError):
                        continue
            family, grew = {me}, True
            while grew:
                more = {pid for pid, parent in parents.items() if parent in family} - family
                family |= more
                grew = bool(more)
            total = 0
            for pid in family - {me}:
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, ValueError, IndexError):
                    continue
            self.peak = max(self.peak, total)


def _sensitivity(model: Any, calibration: Any, executor: Any, windows: int) -> tuple[str, dict[str, Any]]:
    import dataclasses

    from bitpass.passes.sensitivity.output import output_sensitivity
    from bitpass.passes.sensitivity.passes import SensitivityConfig, table_bits

    # the library core the sensitivity pass (method=output-kl) wraps, with the pass's defaults, time budget off
    defaults = SensitivityConfig()
    result = output_sensitivity(model, calibration, metric="kl", bits=table_bits(defaults.bits), samples=windows,
                                batch_size=min(windows, 8), time_budget=None, extrapolate=defaults.extrapolate,
                                executor=executor)
    digest = hashlib.sha256(json.dumps({k: {str(b): v.hex() for b, v in row.items()} for k, row in result.table.items()},
                                       sort_keys=True).encode()).hexdigest()
    record = {k: v for k, v in dataclasses.asdict(result).items() if k != "table"}
    return digest, {**record, "layers": len(result.table), "ort_runs": result.runs}


def _quantize(model: Any, calibration: Any, executor: Any, windows: int) -> tuple[str, dict[str, Any]]:
    from bitpass.passes.weight_only.quantize import Recipe, quantize_weights

    recipe = Recipe(method="gptq", bits=3.5, widths=(2, 4, 8), group_size=32, samples=windows)
    result, record = quantize_weights(model, calibration, recipe, executor=executor)
    return hashlib.sha256(result.to_bytes()).hexdigest(), record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitpass.tools.bench_scaleout",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"],
                        help="GPT-2 size (default: %(default)s, 124 M parameters)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small GPT-2 ({QUICK}), 8 windows of 64 tokens: about 1-2 min")
    parser.add_argument("--step", default="sensitivity", choices=["sensitivity", "quantize-weights"])
    parser.add_argument("--executors", default="serial,local:2,ray",
                        help="comma-separated executor specs (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=None,
                        help="calibration windows (default: 8 for sensitivity, 32 for quantize-weights)")
    parser.add_argument("--length", type=int, default=None, help="tokens per window (default: 128; --quick 64)")
    args = parser.parse_args(argv)
    windows = args.windows or (8 if args.step == "sensitivity" else 32)
    length = args.length or (64 if args.quick else 128)

    from bitpass.frontend import from_arrays
    from bitpass.frontend.cpu import host
    from bitpass.frontend.decoder import complete_lm_inputs
    from bitpass.passes.executors import executor_from_spec
    from bitpass.passes.weight_only.hessians import layer_input_hessians

    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    print(host().describe(), flush=True)
    started = time.perf_counter()
    model, spec, name = _model(args.size, args.quick)
    feeds, _ = complete_lm_inputs({"input_ids": np.random.default_rng(0).integers(0, spec.vocab, (windows, length))},
                                  spec)
    calibration = from_arrays(feeds, model.inputs)
    say(f"exported {name} ({sum(layer.params for layer in model.layers()) / 1e6:.1f} M weights in "
        f"{len(model.layers())} layers) in {time.perf_counter() - started:.0f} s")
    hessian_s = 0.0
    if args.step == "quantize-weights":
        inputs = [layer.node.inputs[0].name or "" for layer in model.layers() if layer.op_type != "Gather"]
        started = time.perf_counter()
        layer_input_hessians(model, inputs, calibration, samples=windows)
        hessian_s = time.perf_counter() - started
        say(f"layer-input Hessians (one ORT run, in every variant): {hessian_s:.1f} s")
    step = _sensitivity if args.step == "sensitivity" else _quantize

    rows = []
    reference: str | None = None
    for text in (t.strip() for t in args.executors.split(",") if t.strip()):
        started = time.perf_counter()
        with DescendantMemory() as memory, executor_from_spec(text) as executor:
            startup = time.perf_counter() - started
            started = time.perf_counter()
            digest, record = step(model, calibration, executor, windows)
            seconds = time.perf_counter() - started
            workers = executor.workers
        reference = reference or digest
        rows.append({"executor": text, "workers": workers, "seconds": seconds, "startup": startup,
                     "same": digest == reference, "record": record, "peak_mb": _peak_mb(),
                     "worker_peak_mb": memory.peak / 2**20})
        say(f"{text}: {seconds:.1f} s")

    serial = rows[0]["seconds"]
    if args.step == "sensitivity":
        record = rows[0]["record"]
        what = (f"sensitivity(method=output-kl): {record['layers']} layers, {record['samples']} windows x {length} "
                f"tokens, {record['ort_runs']} ORT runs ({record.get('suffix_runs', 0)} suffix-only), "
                f"time budget off")
    else:
        what = (f"quantize-weights(method=gptq, bits=3.5, widths=2/4/8, group_size=32), {windows} x {length} "
                f"calibration tokens; Hessians {hessian_s:.1f} s of each run")
    print(f"{name}, {what}")
    print("| executor | workers | seconds | x serial | same result | start-up s | peak RSS MB: this process (so far) "
          "| workers (all, at once) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['executor']} | {row['workers']} | {row['seconds']:.1f} | {serial / row['seconds']:.2f} | "
              f"{'yes' if row['same'] else 'NO'} | {row['startup']:.1f} | {row['peak_mb']:.0f} | "
              f"{row['worker_peak_mb']:.0f} |")
    return 0 if all(row["same"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
