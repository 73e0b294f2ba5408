"""Scale-out: the same decoder compile on one process, on local worker processes and on a local Ray cluster.

    python -m bitpass.tools.bench_scaleout                 # GPT-2 small (124 M), serial / local:2 / ray
    python -m bitpass.tools.bench_scaleout --size tiny     # a 2-layer GPT-2 (seconds)

For each executor it runs ``quantize_weights`` (GPTQ, mixed 2/4/8-bit groups at 3.5 average bits: per-layer slice
errors, then per-layer rounding, the loops an executor spreads) on the same exported model and calibration
windows, and prints wall seconds, the speed-up over serial of the whole step and of its per-layer part (the
layer-input Hessians are collected by one ONNX Runtime run in the parent whatever the executor, timed apart),
and whether the written model is byte-identical to serial's. The CPU line is printed above the table: the
speed-up depends on the cores the executors have (a 2-core machine can at best halve the per-layer part).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence

import numpy as np


def _model(size: str):
    from bitpass.frontend.decoder import export_decoder
    from bitpass.tools import decoders

    lm = decoders.tiny_gpt2(width=64) if size == "tiny" else decoders.gpt2_sized(size)
    return export_decoder(lm, name=f"gpt2-{size}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitpass.tools.bench_scaleout",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"],
                        help="GPT-2 size (default: %(default)s, 124 M parameters)")
    parser.add_argument("--executors", default="serial,local:2,ray",
                        help="comma-separated executor specs (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows (default: %(default)s)")
    parser.add_argument("--length", type=int, default=128, help="tokens per window (default: %(default)s)")
    args = parser.parse_args(argv)

    from bitpass.frontend import from_arrays
    from bitpass.frontend.cpu import host
    from bitpass.frontend.decoder import complete_lm_inputs
    from bitpass.passes.executors import executor_from_spec
    from bitpass.passes.weight_only.hessians import layer_input_hessians
    from bitpass.passes.weight_only.quantize import Recipe, quantize_weights

    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    model, spec = _model(args.size)
    rng = np.random.default_rng(0)
    vocab = spec.vocab
    feeds, _ = complete_lm_inputs({"input_ids": rng.integers(0, vocab, (args.windows, args.length))}, spec)
    calibration = from_arrays(feeds, model.inputs)
    say(f"exported gpt2-{args.size} ({sum(layer.params for layer in model.layers()) / 1e6:.0f} M weights in "
        f"{len(model.layers())} layers) in {time.perf_counter() - started:.0f} s")
    recipe = Recipe(method="gptq", bits=3.5, widths=(2, 4, 8), group_size=32, samples=args.windows)

    inputs = [layer.node.inputs[0].name or "" for layer in model.layers() if layer.op_type != "Gather"]
    started = time.perf_counter()
    layer_input_hessians(model, inputs, calibration, samples=args.windows)
    hessian_s = time.perf_counter() - started
    say(f"layer-input Hessians (one ORT run, in every variant): {hessian_s:.1f} s")

    rows = []
    reference: str | None = None
    for text in args.executors.split(","):
        with executor_from_spec(text.strip()) as executor:
            started = time.perf_counter()
            result, record = quantize_weights(model, calibration, recipe, executor=executor)
            seconds = time.perf_counter() - started
            workers = executor.workers
        digest = hashlib.sha256(result.to_bytes()).hexdigest()[:16]
        reference = reference or digest
        rows.append((text.strip(), workers, seconds, digest == reference, record["average_bits"]))
        say(f"{text}: {seconds:.1f} s")
        del result

    serial = rows[0][2]
    print(host().describe())
    print(f"gpt2-{args.size}, quantize-weights(method=gptq, bits=3.5, widths=2/4/8, group_size=32), "
          f"{args.windows} x {args.length} calibration tokens; Hessians {hessian_s:.1f} s of each run")
    print("| executor | workers | seconds | x serial | per-layer part x serial | same artifact | average bits |")
    print("|---|---|---|---|---|---|---|")
    for name, workers, seconds, same, bits in rows:
        part = (serial - hessian_s) / max(1e-9, seconds - hessian_s)
        print(f"| {name} | {workers} | {seconds:.1f} | {serial / seconds:.2f} | {part:.2f} | "
              f"{'yes' if same else 'NO'} | {bits:.2f} |")
    return 0 if all(row[3] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
