"""Benchmark the TVM backend against ONNX Runtime, side by side, in one run.

    .venv/bin/python -m bitpass.tools.bench_tvm [--quick | --dense-only] [--threads N]

* The project's CNN and transformer (trained on the digits) per precision (fp32; int8 everywhere; 4-bit
  Gemm/MatMul weights): the TVM artifact vs the ORT artifact of the same plan (bitpass's ``quantize``:
  int8 QDQ, MatMulNBits) vs ORT fp32, batch 1 and 64.
* A 4096×4096 weight-only GEMV at batch 1: TVM fp32 / int8 / int4 kernels vs ORT fp32 MatMul and
  ORT MatMulNBits 4-bit (block 128, accuracy_level 4, so int8 activations as ours), with the achieved
  fraction of measured read bandwidth (best of a numpy max and a BLAS GEMV over 256 MiB; the numpy
  copy figure is printed too). The int4 weight (8.4 MB) is about the size of an 8 MiB L3: part of it
  may be served from cache.
* The CNN's convolutions (shapes from ``zoo.digits_cnn``), batch 1 and 64: TVM int8 conv vs TVM fp32
  conv, both with bias and ReLU fused, as the lowering emits them.
* The int8 dense vs the fp32 dense (TVM, bias fused) on the CNN's Gemm, the transformer's MatMuls and
  the 4096² layer, at batch 1 and 64 (the transformer's rows are batch × 8 tokens: 8 and 512 too).

Variants alternate inside one process and medians are reported (NOTES.md: ORT timings drift); numpy
is timed apart, after the others, because OpenBLAS's spinning threads slow whatever runs next.
Ratios are "other / TVM" latency: above 1 means TVM is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _timed(fns: dict[str, Callable[[], object]], rounds: int, min_seconds: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each function; the functions alternate within a round."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    calls = {}
    for name, fn in fns.items():
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds or n < 3:
            fn()
            n += 1
        calls[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def memory_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Bytes per second of a large numpy copy (read + write)."""
    a = np.ones(mib << 18, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second read from a large array: the best of a numpy max (one pass, SIMD) and a BLAS
    GEMV over the array as a matrix (multi-threaded streaming reads, the GEMV kernels' access pattern)."""
    a = np.ones(mib << 18, np.float32)
    matrix, vector = a.reshape(-1, 4096), np.ones(4096, np.float32)
    best = float("inf")
    for fn in (a.max, lambda: matrix @ vector):
        fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return a.nbytes / best


def _ort_session(proto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


#: the model section's precisions: the ``set-bits`` specs both backends get (TVM lowers the annotations
#: itself; ORT's artifact is bitpass's ``quantize`` of the same plan)
PRECISIONS = {
    "fp32": [],
    "int8": ["set-bits(weight=8,activation=8,format=qdq)"],
    "w4 dense": ["set-bits(layers='{dense}',weight=4,format=matmulnbits)"],
}


def _plan(base, specs: list[str], calib):
    """(the annotated model TVM compiles, the ORT model of the same plan), both from ``base``."""
    from bitpass.passes.infra import PassContext
    from bitpass.plugins import default_registry

    if not specs:
        return base, base
    dense = ",".join(l.id for l in base.layers() if l.op_type in ("Gemm", "MatMul"))
    ctx = PassContext(calibration=calib)
    annotated = default_registry().pipeline(",".join(["calibrate", *(s.format(dense=dense) for s in specs)])).run(
        base.clone(), ctx)
    return annotated, default_registry().pipeline("quantize").run(annotated.clone(), ctx)


def bench_models(threads: int, rounds: int) -> list[tuple[str, float, float, float]]:
    """(label, TVM s, ORT s of the same plan, ORT fp32 s) for the digits CNN and transformer per precision
    and batch; TVM's outputs are checked against ORT fp32 first (fp32: rtol 1e-3; quantized: mean cosine
    above 0.99: the two backends quantize activations differently, so they are not compared with each other)."""
    import torch

    from bitpass.backends.tvm import TvmBackend
    from bitpass.frontend import from_arrays, from_torch
    from bitpass.passes.infra import PassContext
    from bitpass.plugins import default_registry
    from bitpass.tools import zoo

    rows = []
    models = {"CNN": zoo.trained_digits_cnn()[0], "transformer": zoo.trained_digits_transformer()[0]}
    split = zoo.digits_split()
    backend = TvmBackend()
    for name, module in models.items():
        base = from_torch(module, (torch.zeros(1, 1, 8, 8),))
        base = default_registry().pipeline("optimize").run(base, PassContext())
        input_name = base.inputs[0].name
        calib = from_arrays({input_name: split.calib_x}, base.inputs)
        ort_fp32 = _ort_session(base.to_proto(), threads)
        for precision, specs in PRECISIONS.items():
            annotated, ort_model = _plan(base, specs, calib)
            with tempfile.TemporaryDirectory() as tmp:
                backend.emit(annotated, Path(tmp), backend.default_target)
                runner = backend.load(Path(tmp), {})
                session = _ort_session(ort_model.to_proto(), threads)
                for batch in (1, 64):
                    x = np.ascontiguousarray(np.resize(split.eval_x, (batch, 1, 8, 8)))
                    got = runner.run({input_name: x})[0]
                    _check_close(f"{name} {precision}", got, ort_fp32.run(None, {input_name: x})[0],
                                 exact=precision == "fp32")
                    t = _timed({"tvm": lambda: runner.run({input_name: x}),
                                "ort": lambda: session.run(None, {input_name: x}),
                                "fp32": lambda: ort_fp32.run(None, {input_name: x})}, rounds)
                    rows.append((f"{name} {precision} batch {batch}", t["tvm"], t["ort"], t["fp32"]))
    return rows


def _check_close(label: str, got: np.ndarray, want: np.ndarray, *, exact: bool) -> None:
    if exact:
        assert np.allclose(got, want, rtol=1e-3, atol=1e-4), f"{label}: TVM differs from ORT"
        return
    from bitpass.backends.measure import cosines

    cosine = float(np.mean(cosines(want, got)))
    assert cosine > 0.99, f"{label}: TVM's quantized outputs are far from fp32 (cosine {cosine:.4f})"


def bench_gemv(threads: int, rounds: int, k: int = 4096, n: int = 4096) -> dict[str, float]:
    import onnx
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import te

    from bitpass.backends.tvm import kernels, schedules, targets

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    spec = targets.get(targets.host_target())
    target = spec.tvm_target()
    lanes = schedules.vector_lanes(spec.features)
    nb = kernels.out_block(n, lanes)
    dev = tvm.cpu()
    tx = te.placeholder((1, k), "float32", "x")

    def build(tensors, kind):
        func = te.create_prim_func(tensors).with_attr({"bitpass.kernel": kind, "bitpass.nb": nb})
        return tvm.compile(schedules.apply_rules(tvm.IRModule({"main": func}), target), target=target)["main"]

    out = tvm.runtime.tensor(np.zeros((1, n), np.float32), dev)
    tvm_x = tvm.runtime.tensor(x, dev)
    fns: dict[str, Callable[[], object]] = {}
    tw = te.placeholder((n // nb, k, nb), "float32", "w")
    f32 = build([tx, tw, kernels.dense(tx, tw, None)], "dense")
    w32 = tvm.runtime.tensor(kernels.pack_dense(w, nb), dev)
    fns["tvm fp32"] = lambda: f32(tvm_x, w32, out)
    codes8, scale8 = kernels.quantize_int8(w, nb)
    tc, ts = te.placeholder(codes8.shape, "uint8", "c"), te.placeholder((n,), "float32", "s")
    tb8 = te.placeholder((n,), "float32", "b")
    f8 = build([tx, tc, ts, tb8, kernels.dense_int8(tx, tc, ts, tb8)], "dense_int8")
    c8, s8 = tvm.runtime.tensor(codes8, dev), tvm.runtime.tensor(scale8, dev)
    b8 = tvm.runtime.tensor(np.zeros(n, np.float32), dev)
    fns["tvm int8"] = lambda: f8(tvm_x, c8, s8, b8, out)
    nb = kernels.int4_out_block(n, lanes)
    q4 = kernels.quantize_int4(w, nb, 128)
    tc4, ts4 = te.placeholder(q4.codes.shape, "uint8", "c"), te.placeholder(q4.scales.shape, "float16", "s")
    tb4 = te.placeholder((n,), "float32", "b")
    f4 = build([tx, tc4, ts4, tb4, kernels.dense_int4(tx, tc4, ts4, tb4, block_size=128)], "dense_int4")
    c4, s4 = tvm.runtime.tensor(q4.codes, dev), tvm.runtime.tensor(q4.scales, dev)
    b4 = tvm.runtime.tensor(np.zeros(n, np.float32), dev)
    fns["tvm int4"] = lambda: f4(tvm_x, c4, s4, b4, out)
    f4(tvm_x, c4, s4, b4, out)
    exact = x @ kernels.dequantize_int4(q4)  # int8 activations: off by the activation rounding only
    assert np.abs(out.numpy() - exact).max() < 0.01 * np.abs(exact).max()

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ort32 = _ort_session(proto, threads)
    fns["ort fp32"] = lambda: ort32.run(None, {"x": x})
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(proto.SerializeToString()), block_size=128,
                                         is_symmetric=True, accuracy_level=4)
        quantizer.process()
        ort4 = _ort_session(quantizer.model.model, threads)
        fns["ort MatMulNBits int4"] = lambda: ort4.run(None, {"x": x})
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"(ORT MatMulNBits unavailable: {err})")
    times = _timed(fns, rounds)
    # numpy last and on its own: OpenBLAS's threads spin after each call and halved the speed of whatever
    # ran next when it alternated with the others (TVM int4 0.85 -> 0.39 ms without it)
    times.update(_timed({"numpy fp32": lambda: x @ w}, rounds))
    return times


#: (K, N, where) of the dense layers the int8 section times: the CNN's Gemm, the transformer's attention
#: projection (q, k, v together) and MLP, and the GEMV benchmark's layer
DENSE_SHAPES = ((1024, 64, "CNN Gemm"), (64, 192, "transformer qkv"), (64, 256, "transformer MLP up"),
                (256, 64, "transformer MLP down"), (4096, 4096, "4096²"))
#: rows of each dense shape: batch 1 and 64, and for the transformer (8 tokens per sample, its MatMuls
#: flattened to [batch × tokens, K] by the lowering) also the rows it really has at those batches
DENSE_ROWS = {"CNN Gemm": (1, 64), "4096²": (1, 64)}
TRANSFORMER_ROWS = (1, 8, 64, 512)


def bench_dense_int8(rounds: int) -> list[tuple[str, float, float]]:
    """(label, fp32 seconds, int8 seconds) of TVM's fp32 and int8 dense kernels (bias fused, as the
    lowering emits them) per shape and row count, timed side by side."""
    import tvm
    from tvm import te

    from bitpass.backends.tvm import kernels, schedules, targets

    spec = targets.get(targets.host_target())
    target = spec.tvm_target()
    lanes = schedules.vector_lanes(spec.features)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)

    def build(tensors, kind: str, nb: int):
        func = te.create_prim_func(tensors).with_attr({"bitpass.kernel": kind, "bitpass.nb": nb})
        return tvm.compile(schedules.apply_rules(tvm.IRModule({"main": func}), target), target=target)["main"]

    rows = []
    for k, n, where in DENSE_SHAPES:
        nb = kernels.out_block(n, lanes)
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        codes, scale = kernels.quantize_int8(w, nb)
        for m in DENSE_ROWS.get(where, TRANSFORMER_ROWS):
            x = rng.standard_normal((m, k)).astype(np.float32)
            tx, tb = te.placeholder((m, k), "float32", "x"), te.placeholder((n,), "float32", "b")
            tw = te.placeholder((n // nb, k, nb), "float32", "w")
            tc, ts = te.placeholder(codes.shape, "uint8", "c"), te.placeholder((n,), "float32", "s")
            f32 = build([tx, tw, tb, kernels.dense(tx, tw, tb)], "dense", nb)
            f8 = build([tx, tc, ts, tb, kernels.dense_int8(tx, tc, ts, tb)], "dense_int8", nb)
            out = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
            a32 = [tvm.runtime.tensor(a, dev) for a in (x, kernels.pack_dense(w, nb), np.zeros(n, np.float32))]
            a8 = [tvm.runtime.tensor(a, dev) for a in (x, codes, scale, np.zeros(n, np.float32))]
            t = _timed({"fp32": lambda: f32(*a32, out), "int8": lambda: f8(*a8, out)}, rounds)
            rows.append((f"{where} {m}x{k}x{n}", t["fp32"], t["int8"]))
    return rows


def cnn_conv_shapes() -> list[tuple[int, int, int, int, int]]:
    """(in channels, out channels, height, width, kernel) of each conv of the project's CNN."""
    import torch

    from bitpass.tools import zoo

    shapes = []
    model = zoo.digits_cnn().eval()
    hooks = [m.register_forward_hook(lambda mod, args, _: shapes.append(
        (mod.in_channels, mod.out_channels, args[0].shape[2], args[0].shape[3], mod.kernel_size[0])))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8))
    for hook in hooks:
        hook.remove()
    return shapes


def bench_conv(rounds: int) -> list[tuple[str, float, float]]:
    """(label, fp32 seconds, int8 seconds) per CNN conv and batch, timed side by side."""
    import tvm
    from tvm import te

    from bitpass.backends.tvm import kernels, schedules, targets

    spec = targets.get(targets.host_target())
    target = spec.tvm_target()
    lanes = schedules.vector_lanes(spec.features)
    dev = tvm.cpu()
    geometry = {"strides": (1, 1), "dilations": (1, 1), "groups": 1}
    attrs = {"bitpass.strides": [1, 1], "bitpass.dilations": [1, 1], "bitpass.groups": 1, "bitpass.act": "relu"}
    rng = np.random.default_rng(0)
    rows = []
    for c, oc, h, wd, k in cnn_conv_shapes():
        ob = kernels.out_block(oc, lanes)
        pad = k // 2
        w = rng.standard_normal((oc, c, k, k)).astype(np.float32)
        taps = kernels.conv_int8_taps(c, k, 1)  # as the lowering packs a single-channel conv
        codes, scale = kernels.quantize_conv_int8(w, ob, taps)
        for batch in (1, 64):
            x = rng.standard_normal((batch, c, h, wd)).astype(np.float32)
            tx, tb = te.placeholder(x.shape, "float32", "x"), te.placeholder((oc,), "float32", "b")
            tw = te.placeholder((oc // ob, c, k, k, ob), "float32", "w")
            tc, ts = te.placeholder(codes.shape, "int8", "c"), te.placeholder((oc,), "float32", "s")
            f32 = te.create_prim_func([tx, tw, tb, kernels.conv2d(tx, tw, tb, pads=(pad,) * 4, act="relu", **geometry)])
            f8 = te.create_prim_func([tx, tc, ts, tb, kernels.conv2d_int8(tx, tc, ts, tb, pads=(pad,) * 4, act="relu",
                                                                          taps=taps, **geometry)])
            fns = {}
            args = {"fp32": (x, kernels.pack_conv(w, ob)), "int8": (x, codes, scale)}
            for name, func, kind in (("fp32", f32, "conv2d"), ("int8", f8, "conv2d_int8")):
                func = func.with_attr({"bitpass.kernel": kind, "bitpass.nb": ob, "bitpass.pads": [pad] * 4,
                                       "bitpass.taps": taps, **attrs})
                built = tvm.compile(schedules.apply_rules(tvm.IRModule({"main": func}), target), target=target)["main"]
                tensors = [tvm.runtime.tensor(a, dev) for a in (*args[name], np.zeros(oc, np.float32),
                                                                np.zeros((batch, oc, h, wd), np.float32))]
                fns[name] = (lambda f, t: lambda: f(*t))(built, tensors)
            t = _timed(fns, rounds)
            rows.append((f"{c}->{oc} {h}x{wd} k{k} batch {batch}", t["fp32"], t["int8"]))
    return rows


def _print_dense(rounds: int) -> None:
    print("\nint8 dense vs fp32 dense (M x K x N)        fp32 ms    int8 ms   fp32/int8 (>1: int8 faster)")
    for label, fp32_s, int8_s in bench_dense_int8(rounds):
        print(f"  {label:<40} {fp32_s * 1e3:8.3f} {int8_s * 1e3:10.3f} {fp32_s / int8_s:9.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="GEMV, conv and dense layers and bandwidth only (no model training)")
    parser.add_argument("--dense-only", action="store_true", help="the int8 vs fp32 dense section only")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    if args.dense_only:
        _print_dense(args.rounds)
        return 0
    copy = memory_bandwidth()
    bandwidth = read_bandwidth()
    print(f"memory bandwidth: read {bandwidth / 1e9:.1f} GB/s (best of numpy max and BLAS GEMV, 256 MiB; "
          f"the % column below), copy {copy / 1e9:.1f} GB/s (read+write); threads {args.threads}")
    gemv = bench_gemv(args.threads, args.rounds)
    print("\n4096x4096 GEMV, batch 1            ms     GB/s   % of bandwidth   ORT fp32 / this")
    weight_bytes = {"fp32": 4 * 4096 * 4096, "int8": 4096 * 4096 + 4 * 4096, "int4": 4096 * 4096 // 2 + 2 * 4096 * 32}
    for name, seconds in gemv.items():
        bits = name.split()[-1]
        nbytes = weight_bytes.get(bits, weight_bytes["fp32"])
        print(f"  {name:<30} {seconds * 1e3:7.3f} {nbytes / seconds / 1e9:8.1f}"
              f" {100 * nbytes / seconds / bandwidth:12.0f} % {gemv['ort fp32'] / seconds:12.2f}x")
    if "ort MatMulNBits int4" in gemv:
        print(f"  TVM int4 vs ORT MatMulNBits: {gemv['ort MatMulNBits int4'] / gemv['tvm int4']:.2f}x (>1: TVM faster)")
    print(f"  TVM int8 vs TVM fp32: {gemv['tvm fp32'] / gemv['tvm int8']:.2f}x; "
          f"int4 vs fp32: {gemv['tvm fp32'] / gemv['tvm int4']:.2f}x")
    print("\nCNN conv layer                     fp32 ms    int8 ms   fp32/int8")
    for label, fp32_s, int8_s in bench_conv(args.rounds):
        print(f"  {label:<30} {fp32_s * 1e3:8.3f} {int8_s * 1e3:10.3f} {fp32_s / int8_s:9.2f}x")
    _print_dense(args.rounds)
    if not args.quick:
        print("\nmodel, precision, batch             TVM ms  ORT same plan ms  ORT fp32 ms   ORT same/TVM  "
              "ORT fp32/TVM")
        for label, tvm_s, ort_s, fp32_s in bench_models(args.threads, args.rounds):
            print(f"  {label:<32} {tvm_s * 1e3:8.3f} {ort_s * 1e3:17.3f} {fp32_s * 1e3:12.3f} "
                  f"{ort_s / tvm_s:13.2f}x {fp32_s / tvm_s:12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
