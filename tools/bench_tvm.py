"""Benchmark the TVM backend against ONNX Runtime on this CPU, side by side, in one run.

    .venv/bin/python -m bitpass.tools.bench_tvm [--quick] [--threads N] [--rounds R] [--batches B ...]
        [--only SECTION ...] [--clock wall|thread] [--fp32-nchw] [--toggle MODULE.FLAG]

Sections (every table is printed beside the CPU's model, flags and caches):

* ``models``: ResNet-18 (torchvision, random init) at batch 1 and 32, MobileNetV3-small at batch 1, a
  BERT-class encoder (transformers, random init; hidden 256, 4 layers, sequence 128) at batch 1: ORT fp32,
  ORT int8 QDQ U8S8 (``quantize_static``, per-channel weights; the fastest ORT int8 on a VNNI CPU), TVM fp32
  and TVM int8 (every Conv/Gemm/MatMul 8-bit: bitpass's kernels; activation ranges calibrated min-max on the
  same feeds as ORT's U8S8, so int8 convs pass each other uint8 codes). Ratios are ORT fp32 latency / variant
  latency (> 1: faster than ORT fp32). TVM's outputs are checked against ORT fp32 first (cosine). On AVX-512
  TVM fp32's convs pass each other blocked NCHW16c activations; ``--fp32-nchw`` also times an NCHW build beside it
  (short for ``--toggle lower.FP32_BLOCKED``; any ``--toggle`` adds a "TVM fp32*" build with that flag flipped).
* ``gemv``: a 4-bit weight-only GEMV at batch 1 on a weight at least twice the last-level cache (sized from
  sysfs), TVM's int4 kernel vs ORT MatMulNBits at block sizes 32, 64 and 128 (accuracy_level 4: int8
  activations, as ours), as a fraction of the measured read bandwidth.
* ``kernels``: ResNet-18's convolutions at batch 1, TVM fp32 and int8 beside ONNX Runtime running the same
  single Conv + ReLU (fp32, and a U8S8 QDQ conv that ORT fuses to QLinearConv), in GMAC/s.
* ``profile``: the whole ResNet-18 where it runs, per operator kind (conv, pool, dense, quantize, other; a
  max pooling TVM fused into the stem conv counts as conv, as ORT's fused Relu does):
  TVM's functions timed by the Relax VM's instrument hooks, ORT's nodes by its own profiler
  (``enable_profiling``), beside each model's whole call. Single ops in isolation hide what a model pays
  between them (ORT keeps NCHWc or uint8 NHWC tensors from layer to layer; TVM's calibrated int8 convs keep
  uint8 channels-last codes).
* ``layers``: ResNet-18's convs at batch 1 where they run in the whole model, TVM fp32 and ORT fp32 at 1 and
  ``--threads`` threads (TVM's pool resized between rounds, an ORT session per count), per conv: ms, each runtime's
  speed-up from 1 thread, ORT/TVM. Rounds in which another process held a core are left out (counted).
  ``--toggle MODULE.FLAG`` times a second TVM build with that flag of ``bitpass.backends.tvm`` flipped beside ("TVM*").

Timing: variants alternate inside one process, thread spinning off on both sides (ORT
``session.intra_op.allow_spinning=0``, ``TVM_THREAD_POOL_SPIN_COUNT=0``), TVM's threads not bound to cores
(``TVM_BIND_THREADS=0``, as ORT's), median of ``--rounds``. On a shared machine, ``--threads 1 --clock thread``
times each call by the calling thread's CPU time (both runtimes then run on it), which other processes do not
inflate: per-core efficiency, not the 2-thread figure.
"""

from __future__ import annotations

import os

# before TVM's runtime starts its pool: timed alternately with ORT, a spinning pool steals the other's cores
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
# TVM binds each pool thread to one core by default; on a shared machine that made its kernels 1.6-1.8x slower
# (the artifacts' runner unbinds them too: ``vmrun.use_all_cores``)
os.environ.setdefault("TVM_BIND_THREADS", "0")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

TIMING_MODE = ("alternating in one process, thread spinning off on both sides "
               "(ORT allow_spinning=0, TVM_THREAD_POOL_SPIN_COUNT=0), TVM threads unbound (TVM_BIND_THREADS=0)")


def print_cpu(threads: int) -> None:
    from bitpass.frontend.cpu import host

    print(f"{host().describe()}; {threads} threads")
    clock = "the calling thread's CPU time" if _clock is time.thread_time else "wall time"
    print(f"timing: {TIMING_MODE}; rounds timed by {clock}")


@contextlib.contextmanager
def _tolerant_register_fake():
    """torchvision's wheel here was built for another torch: importing it registers fake kernels for C++
    operators (``torchvision::nms``) this torch does not have, and fails. The model definitions are pure
    Python, so while torchvision (or transformers, which imports it) loads, a registration of a missing
    operator is skipped."""
    import torch

    original = torch.library.register_fake

    def register_fake(*args, **kwargs):
        try:
            decorate = original(*args, **kwargs)
        except RuntimeError:
            return lambda fn: fn

        def apply(fn):
            try:
                return decorate(fn)
            except RuntimeError:
                return fn

        return apply

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = original


def torchvision_model(name: str, **kwargs):
    """A torchvision classification model (random init, eval mode), e.g. ``resnet18``, ``mobilenet_v3_small``."""
    with _tolerant_register_fake():
        import torchvision.models

        return getattr(torchvision.models, name)(**kwargs).eval()


def bert_encoder(hidden: int = 64, layers: int = 2, heads: int = 2, vocab: int = 100, positions: int = 32):
    """A BERT-class encoder from transformers (random init, eval mode); BERT-base is hidden 768, 12 layers, 12 heads."""
    import torch

    with _tolerant_register_fake():
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden, max_position_embeddings=positions)
        torch.manual_seed(0)
        return BertModel(config).eval()


def rotation(names: list[str], index: int) -> list[str]:
    """Round ``index``'s order of ``names``: the list rotated by ``index``."""
    shift = index % len(names) if names else 0
    return names[shift:] + names[:shift]


def _timed(fns: dict[str, Callable[[], object]], rounds: int, min_seconds: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each function; the functions alternate within a round."""
    return {name: statistics.median(v) for name, v in _samples(fns, rounds, min_seconds).items()}


#: the clock rounds are timed by: wall time, or with ``--clock thread`` the calling thread's CPU time
#: (``time.thread_time``), which leaves out the time other processes hold the core: on a shared machine the
#: one robust comparison, valid at one thread only (TVM and ORT then run on the calling thread)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}
_clock: Callable[[], float] = time.perf_counter


def use_clock(name: str, threads: int) -> None:
    """Time rounds by ``name``'s clock (``CLOCKS``); the thread clock only at one thread (others' work would not
    count)."""
    global _clock
    if name == "thread" and threads != 1:
        raise ValueError(f"--clock thread times the calling thread only: use it with --threads 1 (not {threads})")
    _clock = CLOCKS[name]


def _samples(fns: dict[str, Callable[[], object]], rounds: int, min_seconds: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each function in each round (a round calls each function for ~``min_seconds``);
    the functions alternate within a round, each round starting one function later (``rotation``): the
    function that runs right after another runtime's (the pool's threads waking) is not always the same.
    Rounds are timed by the clock ``use_clock`` chose (wall time by default)."""
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
    for index in range(rounds):
        for name in rotation(list(fns), index):
            fn = fns[name]
            start = _clock()
            for _ in range(calls[name]):
                fn()
            samples[name].append((_clock() - start) / calls[name])
    return samples


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


def _ort_session_bytes(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def ort_u8s8(model, feeds: list[dict[str, np.ndarray]]) -> bytes:
    """ORT's static int8 QDQ model of ``model`` (a bitpass Model): U8S8 (uint8 activations, per-channel int8
    weights), MinMax calibration on ``feeds``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        proto = model.to_proto()
        del proto.graph.value_info[:]
        onnx.save(proto, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return dst.read_bytes()


def _models(quick: bool) -> list[tuple[str, Any, dict[str, np.ndarray], tuple[int, ...]]]:
    """(name, bitpass Model after ``optimize``, one batch-1 feed, batches to time)."""
    import torch

    from bitpass.frontend import from_torch
    from bitpass.passes.infra import PassContext, Target
    from bitpass.plugins import default_registry

    rng = np.random.default_rng(0)
    out = []
    torch.manual_seed(0)
    specs = [("ResNet-18", lambda: torchvision_model("resnet18"), "image", (1, 32)),
             ("MobileNetV3-small", lambda: torchvision_model("mobilenet_v3_small"), "image", (1,)),
             ("BERT-class encoder (h256, 4 layers, seq 128)", lambda: bert_encoder(256, 4, 4, 1000, 128), "text", (1,))]
    for name, make, kind, batches in specs[:1] if quick else specs:
        module = make()
        if kind == "image":
            example = (torch.zeros(1, 3, 224, 224),)
        else:
            example = (torch.zeros(1, 128, dtype=torch.int64), torch.ones(1, 128, dtype=torch.int64))
        # a TVM target: ORT-only fusions (fuse-transformer's contrib operators) stay out of the graph
        model = default_registry().pipeline("optimize").run(from_torch(module, example),
                                                             PassContext(target=Target(backend="tvm")))
        if kind == "image":
            feed = {model.inputs[0].name: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
        else:
            feed = {model.inputs[0].name: rng.integers(0, 1000, (1, 128)),
                    model.inputs[1].name: np.ones((1, 128), np.int64)}
        out.append((name, model, feed, batches))
    return out


def _int8_plan(model):
    """Every Conv/Gemm/MatMul layer annotated 8-bit weights (TVM lowers them to its int8 kernels)."""
    from bitpass.frontend import annotation

    planned = model.clone()
    for layer in planned.layers():
        if layer.op_type in ("Conv", "Gemm", "MatMul"):
            annotation.set_weight_bits(layer.node, 8)
    return planned


def calibrated_ranges(model, calib: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Min-max activation ranges of ``model`` over the calibration feeds (as ORT U8S8's ``quantize_static`` is
    calibrated here): the TVM int8 build passes uint8 codes of these scales between its int8 convs."""
    from bitpass.frontend.data import from_arrays
    from bitpass.passes.calibrate import compute_ranges

    data = from_arrays({k: np.concatenate([f[k] for f in calib]) for k in calib[0]}, model.inputs, source="bench")
    return compute_ranges(model, data, method="minmax")


def bench_models(threads: int, rounds: int, quick: bool = False,
                 only_batches: tuple[int, ...] | None = None, toggle: str | None = None) -> list[dict[str, Any]]:
    """Per model and batch: milliseconds of ORT fp32, ORT U8S8, TVM fp32 and TVM int8, and TVM's cosine to
    ORT fp32 (outputs flattened per sample). ``toggle`` names a boolean of ``bitpass.backends.tvm``
    ("lower.FP32_BLOCKED"): TVM fp32 is also built with it flipped ("TVM fp32*") and timed beside, an A/B of
    the whole model in one run."""
    from bitpass.backends.measure import cosines
    from bitpass.backends.tvm import TvmBackend

    rows = []
    for name, model, feed, batches in _models(quick):
        batches = tuple(b for b in batches if only_batches is None or b in only_batches) or batches
        batched = {b: {k: np.ascontiguousarray(np.repeat(v, b, axis=0)) for k, v in feed.items()} for b in batches}
        calib = [{k: (v + 0.1 * np.random.default_rng(i).standard_normal(v.shape)).astype(v.dtype)
                  if v.dtype.kind == "f" else v for k, v in feed.items()} for i in range(8)]
        sessions = {"ORT fp32": _ort_session_bytes(model.to_bytes(), threads),
                    "ORT U8S8": _ort_session_bytes(ort_u8s8(model, calib), threads)}
        backend = TvmBackend(batches=batches)
        runners = {}
        with tempfile.TemporaryDirectory() as tmp:
            ranges = calibrated_ranges(model, calib)
            variants = [("TVM fp32", model), ("TVM int8", _int8_plan(model))]
            for label, plan in variants + ([("TVM fp32*", model)] if toggle else []):
                start = time.perf_counter()
                directory = Path(tmp) / label.replace(" ", "_").replace("*", "_flipped")
                directory.mkdir()
                with _flipped(toggle if label == "TVM fp32*" else None):
                    backend.emit(plan, directory, backend.default_target,
                                 activation_ranges=ranges if label == "TVM int8" else None)
                runners[label] = backend.load(directory, {})
                print(f"  ({name}: {label} built in {time.perf_counter() - start:.0f} s)", flush=True)
            for batch in batches:
                x = batched[batch]
                want = sessions["ORT fp32"].run(None, x)[0].reshape(batch, -1)
                fns: dict[str, Callable[[], object]] = {
                    label: (lambda s: lambda: s.run(None, x))(session) for label, session in sessions.items()}
                fns.update({label: (lambda r: lambda: r.run(x))(runner) for label, runner in runners.items()})
                row: dict[str, Any] = {"model": name, "batch": batch}
                for label in runners:
                    got = runners[label].run(x)[0].reshape(batch, -1)
                    row[f"{label} cosine"] = float(np.mean(cosines(want, got)))
                got = sessions["ORT U8S8"].run(None, x)[0].reshape(batch, -1)
                row["ORT U8S8 cosine"] = float(np.mean(cosines(want, got)))
                samples = _samples(fns, rounds)
                row.update({label: statistics.median(v) for label, v in samples.items()})
                row.update({f"{label} best": min(v) for label, v in samples.items()})
                rows.append(row)
    return rows


def print_models(rows: list[dict[str, Any]], threads: int, toggle: str | None = None) -> None:
    print()
    print_cpu(threads)
    if toggle:
        print(f"TVM fp32*: {toggle} flipped")
    labels = ("ORT fp32", "ORT U8S8", "TVM fp32", "TVM int8")
    print(f"{'model':<46} {'batch':>5}  " + "  ".join(f"{lb + ' ms':>12}" for lb in labels)
          + "   ratio to ORT fp32 (>1 faster): U8S8 / TVM fp32 / TVM int8   cosine TVM fp32 / int8 / ORT U8S8")
    for row in rows:
        base = row["ORT fp32"]
        print(f"{row['model']:<46} {row['batch']:>5}  " + "  ".join(f"{row[lb] * 1e3:12.2f}" for lb in labels)
              + f"   {base / row['ORT U8S8']:5.2f} / {base / row['TVM fp32']:5.2f} / {base / row['TVM int8']:5.2f}"
              + f"   {row['TVM fp32 cosine']:.5f} / {row['TVM int8 cosine']:.4f} / {row['ORT U8S8 cosine']:.4f}")
    for row in rows:
        print(f"  {row['model']} batch {row['batch']}: TVM int8 vs ORT U8S8 {row['ORT U8S8'] / row['TVM int8']:.2f}x, "
              f"TVM fp32 vs ORT fp32 {row['ORT fp32'] / row['TVM fp32']:.2f}x (medians); best times: "
              f"{row['ORT U8S8 best'] / row['TVM int8 best']:.2f}x, {row['ORT fp32 best'] / row['TVM fp32 best']:.2f}x")
        if "TVM fp32*" in row:
            print(f"  {row['model']} batch {row['batch']}: TVM fp32 {row['TVM fp32'] * 1e3:.2f} ms vs TVM fp32* "
                  f"{row['TVM fp32*'] * 1e3:.2f} ms: TVM fp32 / TVM fp32* {row['TVM fp32*'] / row['TVM fp32']:.3f}x "
                  f"(>1: the default faster); TVM fp32* vs ORT fp32 {row['ORT fp32'] / row['TVM fp32*']:.2f}x "
                  f"(medians)")


def gemv_size(last_level_cache: int, factor: int = 2, step: int = 1024) -> int:
    """K = N of a square int4 weight at least ``factor`` × the last-level cache (and at least 8192), a multiple
    of ``step``: its 4-bit codes cannot be served from cache between calls."""
    side = 8192
    while side * side // 2 < factor * last_level_cache:
        side += step
    return side


def matmulnbits_model(w: np.ndarray, block_size: int) -> tuple[bytes, np.ndarray]:
    """An ONNX model y = x @ w with ``w`` [K, N] as ORT's com.microsoft MatMulNBits (4 bits, symmetric,
    ``block_size`` k per scale, accuracy_level 4), packed directly in numpy, and the weight it stands for."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    blocks = k // block_size
    wt = w.T.reshape(n, blocks, block_size).astype(np.float64)
    scale = np.abs(wt).max(axis=2) / 7.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(wt / scale[..., None]), -8, 7) + 8).astype(np.uint8)  # [N, blocks, bs], zero point 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # low nibble first
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block_size, accuracy_level=4)
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(packed, "b"),
                               numpy_helper.from_array(scale.astype(np.float32), "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    dequantized = ((q.astype(np.float32) - 8) * scale[..., None].astype(np.float32)).reshape(n, k).T
    return proto.SerializeToString(), dequantized


def bench_gemv(threads: int, rounds: int) -> dict[str, Any]:
    """TVM's int4 GEMV vs ORT MatMulNBits per block size on a weight ≥ 2× the last-level cache: seconds, bytes."""
    import tvm
    from tvm import te

    from bitpass.backends.tvm import kernels, schedules, targets
    from bitpass.backends.tvm.kernel_attrs import KernelAttrs
    from bitpass.frontend.cpu import host

    llc = host().last_level_cache or 32 << 20
    k = n = gemv_size(llc)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    spec = targets.get(targets.host_target())
    target = spec.tvm_target()
    scheme = kernels.scheme_for(spec.features)
    dev = tvm.cpu()
    fns: dict[str, Callable[[], object]] = {}
    nbytes: dict[str, int] = {}
    tx = te.placeholder((1, k), "float32", "x")
    out = tvm.runtime.tensor(np.zeros((1, n), np.float32), dev)
    tvm_x = tvm.runtime.tensor(x, dev)
    for bs in (32, 128):
        nb = kernels.int4_out_block(n, scheme.lanes)
        q = kernels.quantize_int4(w, nb, bs)
        tc, ts = te.placeholder(q.codes.shape, "uint8", "c"), te.placeholder(q.scales.shape, "float16", "s")
        tb = te.placeholder((n,), "float32", "b")
        func = KernelAttrs("dense_int4", nb).tag(te.create_prim_func(
            [tx, tc, ts, tb, kernels.dense_int4(tx, tc, ts, tb, block_size=bs)]))
        built = tvm.compile(schedules.apply_rules(tvm.IRModule({"main": func}), target), target=target)["main"]
        args = [tvm_x, tvm.runtime.tensor(q.codes, dev), tvm.runtime.tensor(q.scales, dev),
                tvm.runtime.tensor(np.zeros(n, np.float32), dev), out]
        built(*args)
        exact = x @ kernels.dequantize_int4(q)  # int8 activations: off by the activation rounding only
        assert np.abs(out.numpy() - exact).max() < 0.01 * np.abs(exact).max(), "TVM int4 GEMV is wrong"
        fns[f"TVM int4 block {bs}"] = (lambda f, a: lambda: f(*a))(built, args)
        nbytes[f"TVM int4 block {bs}"] = q.nbytes
        del q
    for bs in (32, 64, 128):
        model, dequantized = matmulnbits_model(w, bs)
        session = _ort_session_bytes(model, threads)
        got = session.run(None, {"x": x})[0]
        reference = x @ dequantized  # int8 activations: off by the activation rounding only
        del model, dequantized
        assert np.abs(got - reference).max() < 0.01 * np.abs(reference).max(), "ORT MatMulNBits is wrong"
        fns[f"ORT MatMulNBits block {bs}"] = (lambda s: lambda: s.run(None, {"x": x}))(session)
        nbytes[f"ORT MatMulNBits block {bs}"] = k * n // 2 + 4 * n * (k // bs)
    del w
    samples = _samples(fns, rounds)
    return {"k": k, "n": n, "llc": llc, "seconds": {name: statistics.median(v) for name, v in samples.items()},
            "best": {name: min(v) for name, v in samples.items()}, "bytes": nbytes}


def print_gemv(result: dict[str, Any], bandwidth: float, threads: int) -> None:
    print()
    print_cpu(threads)
    k, n = result["k"], result["n"]
    print(f"int4 GEMV batch 1, {k}x{n} ({k * n // 2 >> 20} MiB of codes, last-level cache {result['llc'] >> 20} MiB); "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s (best of numpy max and BLAS GEMV over 256 MiB)")
    print(f"  {'variant':<28} {'median ms':>10} {'best ms':>8} {'GB/s best':>10} {'% of read bw (best)':>20}")
    for name, seconds in result["seconds"].items():
        best = result["best"][name]
        rate = result["bytes"][name] / best
        print(f"  {name:<28} {seconds * 1e3:10.3f} {best * 1e3:8.3f} {rate / 1e9:10.1f} "
              f"{100 * rate / bandwidth:19.0f} %")
    for stat in ("seconds", "best"):
        ours = min(v for key, v in result[stat].items() if key.startswith("TVM"))
        theirs = min(v for key, v in result[stat].items() if key.startswith("ORT"))
        label = "medians" if stat == "seconds" else "best times"
        print(f"  best TVM vs best ORT MatMulNBits ({label}): {theirs / ours:.2f}x (>1: TVM faster)")


def resnet18_convs() -> list[tuple[int, int, int, int, int]]:
    """(in channels, out channels, input size, kernel, stride) of ResNet-18's distinct convolutions."""
    return [(3, 64, 224, 7, 2), (64, 64, 56, 3, 1), (64, 128, 56, 3, 2), (64, 128, 56, 1, 2), (128, 128, 28, 3, 1),
            (128, 256, 28, 3, 2), (256, 256, 14, 3, 1), (256, 512, 14, 3, 2), (512, 512, 7, 3, 1)]


def conv_model_fp32(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> bytes:
    """A single Conv + ReLU ONNX model for ORT (zero bias)."""
    from onnx import TensorProto, helper, numpy_helper

    oc = w.shape[0]
    attrs = {"strides": [stride, stride], "pads": [pad] * 4}
    fp32 = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs), helper.make_node("Relu", ["c"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(oc, np.float32), "b")])
    return helper.make_model(fp32, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def conv_model_u8s8(x: np.ndarray, w: np.ndarray, stride: int, pad: int, y_max: float) -> bytes:
    """The same conv as U8S8 QDQ (input uint8 from this input's range, output uint8 up to ``y_max``, weights
    int8 per output channel), which ORT fuses to QuantizeLinear → QLinearConv → DequantizeLinear."""
    from onnx import TensorProto, helper, numpy_helper

    oc = w.shape[0]
    attrs = {"strides": [stride, stride], "pads": [pad] * 4}
    xs = np.float32(np.abs(x).max() / 127.0)
    wscale = (np.abs(w).reshape(oc, -1).max(axis=1) / 127.0).astype(np.float32)
    wq = np.clip(np.rint(w / wscale[:, None, None, None]), -127, 127).astype(np.int8)
    ys = np.float32(max(y_max, 1e-6) / 255.0)
    inits = [numpy_helper.from_array(np.array(xs, np.float32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wscale, "ws"),
             numpy_helper.from_array(np.zeros(oc, np.int8), "wz"),
             numpy_helper.from_array(np.zeros(oc, np.int32), "bq"),
             numpy_helper.from_array((wscale * xs).astype(np.float32), "bs"),
             numpy_helper.from_array(np.array(ys, np.float32), "ys"),
             numpy_helper.from_array(np.array(0, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], **attrs), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    qdq = helper.make_graph(nodes, "conv_qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(qdq, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def bench_convs(rounds: int, batch: int = 1, threads: int = 2) -> list[tuple[str, dict[str, float], float]]:
    """(label, seconds per variant, multiply-adds) per ResNet-18 conv: TVM fp32 and int8 kernels and ORT's
    fp32 and U8S8 QDQ single Conv + ReLU, timed side by side (alternating) in this process."""
    import tvm
    from tvm import te

    from bitpass.backends.tvm import kernels, schedules, targets
    from bitpass.backends.tvm.kernel_attrs import KernelAttrs

    spec = targets.get(targets.host_target())
    target = spec.tvm_target()
    scheme = kernels.scheme_for(spec.features)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    rows = []
    for c, oc, hw, kk, stride in resnet18_convs():
        pad = kk // 2
        geometry = {"strides": (stride, stride), "pads": (pad,) * 4, "dilations": (1, 1), "groups": 1}
        ob = kernels.out_block(oc, scheme.lanes)
        w = (rng.standard_normal((oc, c, kk, kk)) / np.sqrt(c * kk * kk)).astype(np.float32)
        x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32)
        codes, scale = kernels.quantize_conv_int8(w, ob, 0, scheme.int8_levels)
        tx, tb = te.placeholder(x.shape, "float32"), te.placeholder((oc,), "float32")
        tw = te.placeholder((oc // ob, c, kk, kk, ob), "float32")
        tc, ts = te.placeholder(codes.shape, "int8"), te.placeholder((oc,), "float32")
        out32 = kernels.conv2d(tx, tw, tb, **geometry, act="relu")
        out8 = kernels.conv2d_int8(tx, tc, ts, tb, **geometry, act="relu", levels=scheme.int8_levels)
        oh = int(out32.shape[2])
        fns: dict[str, Callable[[], object]] = {}
        for label, tensors, kind, arrays in (("TVM fp32", [tx, tw, tb, out32], "conv2d", (x, kernels.pack_conv(w, ob))),
                                             ("TVM int8", [tx, tc, ts, tb, out8], "conv2d_int8", (x, codes, scale))):
            func = KernelAttrs(kind, ob, act="relu", levels=scheme.int8_levels if kind == "conv2d_int8" else 0,
                               **geometry).tag(te.create_prim_func(tensors))
            built = tvm.compile(schedules.apply_rules(tvm.IRModule({"main": func}), target), target=target)["main"]
            tensors_ = [tvm.runtime.tensor(a, dev) for a in (*arrays, np.zeros(oc, np.float32),
                                                             np.zeros((batch, oc, oh, oh), np.float32))]
            fns[label] = (lambda f, t: lambda: f(*t))(built, tensors_)
        fp32 = _ort_session_bytes(conv_model_fp32(x, w, stride, pad), threads)
        want = fp32.run(None, {"x": x})[0]
        u8s8 = _ort_session_bytes(conv_model_u8s8(x, w, stride, pad, float(want.max())), threads)
        got = u8s8.run(None, {"x": x})[0]
        assert np.abs(got - want).max() < 0.05 * want.max(), "ORT's U8S8 conv is wrong"
        for label, session in (("ORT fp32", fp32), ("ORT U8S8", u8s8)):
            fns[label] = (lambda s: lambda: s.run(None, {"x": x}))(session)
        t = _timed(fns, rounds)
        macs = batch * oc * oh * oh * c * kk * kk
        rows.append((f"{c}->{oc} {hw}x{hw} k{kk} s{stride}", t, macs))
    return rows


CONV_VARIANTS = ("TVM fp32", "ORT fp32", "TVM int8", "ORT U8S8")


def print_convs(rows, threads: int) -> None:
    print()
    print_cpu(threads)
    print(f"ResNet-18 convolutions, batch 1, GMAC/s  " + " ".join(f"{v:>9}" for v in CONV_VARIANTS)
          + "   TVM/ORT fp32  TVM int8/ORT U8S8 (>1: TVM faster)")
    totals = dict.fromkeys(CONV_VARIANTS, 0.0)
    for label, seconds, macs in rows:
        for v in CONV_VARIANTS:
            totals[v] += seconds[v]
        fp32, int8 = seconds["ORT fp32"] / seconds["TVM fp32"], seconds["ORT U8S8"] / seconds["TVM int8"]
        print(f"  {label:<38} " + " ".join(f"{macs / seconds[v] / 1e9:9.1f}" for v in CONV_VARIANTS)
              + f"   {fp32:12.2f}  {int8:17.2f}")
    print(f"  {'sum of times (ms)':<38} " + " ".join(f"{totals[v] * 1e3:9.2f}" for v in CONV_VARIANTS)
          + f"   {totals['ORT fp32'] / totals['TVM fp32']:12.2f}  {totals['ORT U8S8'] / totals['TVM int8']:17.2f}")


def tvm_op_kind(function: str) -> str:
    """The operator kind of a Relax VM function (``bitpass_conv2d_int83``, ``max_pool2d1``, ``mean``)."""
    name = function.lower()
    for kind, words in (("conv", ("conv",)), ("dense", ("dense", "matmul")), ("pool", ("pool",))):
        if any(w in name for w in words):
            return kind
    return "other"


def ort_op_kind(op_type: str) -> str:
    """The operator kind of an ONNX Runtime node (``QLinearConv``, ``NhwcMaxPool``, ``QGemm``, ...)."""
    name = op_type.lower()
    for kind, words in (("conv", ("conv",)), ("dense", ("gemm", "matmul")), ("pool", ("pool",)),
                        ("quantize", ("quantizelinear",))):
        if any(w in name for w in words):
            return kind
    return "other"


PROFILE_KINDS = ("conv", "pool", "dense", "quantize", "other")


def profile_tvm(runner, feed: dict[str, np.ndarray], batch: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each operator kind and of the whole call, TVM's functions timed where they
    run (the VM's instrument hooks; the VM's own builtins count as "other")."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(runner.library, runner.device)
    started: dict[str, float] = {}
    per_call: list[dict[str, float]] = []

    def record(func, name, before_run, ret_value, *args):
        name, now = str(name), time.perf_counter()
        if before_run:
            started[name] = now
        elif name in started:
            kind = "other" if name.startswith("vm.") else tvm_op_kind(name)
            per_call[-1][kind] = per_call[-1].get(kind, 0.0) + now - started.pop(name)
        return 0

    vm.set_instrument(record)
    function = vm[runner.functions[batch]]
    args = [tvm.runtime.tensor(np.ascontiguousarray(feed[n]), runner.device) for n in runner.input_names]
    per_call.append({})
    function(*args)
    per_call.clear()
    for _ in range(calls):
        per_call.append({})
        start = time.perf_counter()
        function(*args)
        per_call[-1]["whole"] = time.perf_counter() - start
    return {kind: statistics.median(c.get(kind, 0.0) for c in per_call) for kind in (*PROFILE_KINDS, "whole")}


def profile_ort(model_bytes: bytes, feed: dict[str, np.ndarray], threads: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each operator kind (ORT's profiler, per node) and of the whole call."""
    import json

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        wholes = []
        for _ in range(calls):
            start = time.perf_counter()
            session.run(None, feed)
            wholes.append(time.perf_counter() - start)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][1:]
    per_call: list[dict[str, float]] = [{} for _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        index = next((i for i, r in enumerate(runs) if r["ts"] <= event["ts"] <= r["ts"] + r["dur"]), None)
        if index is not None:
            kind = ort_op_kind(event["args"]["op_name"])
            per_call[index][kind] = per_call[index].get(kind, 0.0) + event["dur"] * 1e-6
    out = {kind: statistics.median(c.get(kind, 0.0) for c in per_call) if per_call else 0.0
           for kind in PROFILE_KINDS}
    out["whole"] = statistics.median(wholes)
    return out


def bench_profile(threads: int, calls: int, batches: tuple[int, ...] = (1, 32)) -> list[dict[str, Any]]:
    """Per batch and variant (TVM fp32, ORT fp32, TVM int8, ORT U8S8) of ResNet-18: seconds per operator kind."""
    from bitpass.backends.tvm import TvmBackend

    (name, model, feed, _), = _models(quick=True)
    calib = [{k: (v + 0.1 * np.random.default_rng(i).standard_normal(v.shape)).astype(v.dtype)
              for k, v in feed.items()} for i in range(8)]
    onnx_models = {"ORT fp32": model.to_bytes(), "ORT U8S8": ort_u8s8(model, calib)}
    backend = TvmBackend(batches=batches)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        ranges = calibrated_ranges(model, calib)
        for label, plan in (("TVM fp32", model), ("TVM int8", _int8_plan(model))):
            directory = Path(tmp) / label.replace(" ", "_")
            directory.mkdir()
            backend.emit(plan, directory, backend.default_target,
                         activation_ranges=ranges if label == "TVM int8" else None)
            runners[label] = backend.load(directory, {}).model
        for batch in batches:
            batched = {k: np.ascontiguousarray(np.repeat(v, batch, axis=0)) for k, v in feed.items()}
            row: dict[str, Any] = {"model": name, "batch": batch}
            for label in ("TVM fp32", "ORT fp32", "TVM int8", "ORT U8S8"):
                row[label] = (profile_tvm(runners[label], batched, batch, calls) if label.startswith("TVM")
                              else profile_ort(onnx_models[label], batched, threads, calls))
            rows.append(row)
    return rows


def print_profile(rows: list[dict[str, Any]], threads: int) -> None:
    print()
    print_cpu(threads)
    labels = ("TVM fp32", "ORT fp32", "TVM int8", "ORT U8S8")
    for row in rows:
        print(f"{row['model']} batch {row['batch']}, ms per call (medians; kinds timed where they run, "
              f"'whole' is an uninstrumented call)")
        print(f"  {'kind':<10} " + " ".join(f"{lb:>10}" for lb in labels))
        for kind in (*PROFILE_KINDS, "whole"):
            print(f"  {kind:<10} " + " ".join(f"{row[lb][kind] * 1e3:10.2f}" for lb in labels))


def _threads_setter() -> Callable[[int], None]:
    """A function that resizes TVM's thread pool in this process (unbound threads over this process's cores)."""
    import tvm

    configure = tvm.get_global_func("runtime.config_threadpool")
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))]
    return lambda n: configure(-3, n, cpus)


def conv_key(weight_elements: int, seen: dict[int, int]) -> tuple[int, int]:
    """The key pairing a conv in TVM's and ORT's runs: its weight's element count (OC·IC·KH·KW, whatever the
    packing; ORT's NCHWc convs pad channels to whole blocks, which ResNet's are) and how many convs of that count
    ran before it in the call (ResNet-18's repeated layers run in the same order in both)."""
    index = seen.get(weight_elements, 0)
    seen[weight_elements] = index + 1
    return weight_elements, index


def tvm_conv_seconds(runner, feed: dict[str, np.ndarray], batch: int, calls: int) -> dict[tuple[int, int], list[float]]:
    """Seconds of each conv function per call (``conv_key`` -> one per call), timed by the VM's instrument hooks."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(runner.library, runner.device)
    started: dict[str, float] = {}
    out: dict[tuple[int, int], list[float]] = {}
    seen: dict[int, int] = {}

    def record(func, name, before_run, ret_value, *args):
        name, now = str(name), time.perf_counter()
        if tvm_op_kind(name) != "conv":
            return 0
        if before_run:
            started[name] = now
        elif name in started:
            dims = [int(d) for d in args[1].shape]
            # a Winograd conv's weights are transformed, [(m+2)², OC/32, IC, 32]: pair it by the 3×3 conv's count
            weight = 9 * int(np.prod(dims[1:])) if "winograd" in name else int(np.prod(dims))
            out.setdefault(conv_key(weight, seen), []).append(now - started.pop(name))
        return 0

    function = vm[runner.functions[batch]]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(feed[n]), runner.device) for n in runner.input_names]
    function(*tensors)
    vm.set_instrument(record)
    for _ in range(calls):
        seen.clear()
        function(*tensors)
    return out


def ort_conv_seconds(session, feed: dict[str, np.ndarray], calls: int) -> tuple[dict, dict]:
    """Seconds of each conv node per call (``conv_key`` -> one per call) from ORT's profiler (a session with
    ``enable_profiling``), and a label per key from ORT's shapes ("C->OC HWxHW kK")."""
    import json

    session.run(None, feed)
    for _ in range(calls):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-calls:]
    out: dict[tuple[int, int], list[float]] = {}
    labels: dict[tuple[int, int], str] = {}
    for run in runs:
        seen: dict[int, int] = {}
        nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                 and run["ts"] <= e["ts"] <= run["ts"] + run["dur"] and ort_op_kind(e["args"]["op_name"]) == "conv"]
        for event in sorted(nodes, key=lambda e: e["ts"]):
            shapes = [next(iter(s.values())) for s in event["args"]["input_type_shape"]]
            x, w = shapes[0], shapes[1]
            y = next(iter(event["args"]["output_type_shape"][0].values()))
            key = conv_key(int(np.prod(w)), seen)
            out.setdefault(key, []).append(event["dur"] * 1e-6)
            labels[key] = f"{w[1]}->{w[0]} {x[2]}x{x[3]}->{y[2]}x{y[3]} k{w[2]}"
    return out, labels


def _ort_profiled(model_bytes: bytes, threads: int, directory: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(directory / f"ort{threads}")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def bench_layers(rounds: int, calls: int = 10, threads: tuple[int, ...] = (1, 2), batch: int = 1,
                 toggle: str | None = None, min_speedup: float = 1.6) -> dict[str, Any]:
    """ResNet-18's convs where they run in the whole model, TVM fp32 and ORT fp32 at each thread count: per
    conv the median seconds over ``rounds`` rounds of ``calls`` calls, TVM's pool resized between rounds and
    one ORT session per count, all alternating in this process. ``toggle`` names a boolean of ``schedules`` or
    ``lower`` (``schedules.ONE_LAUNCH``): a second TVM build with it flipped ("TVM*") is timed beside. Rounds
    in which another process held a core (``quiet_round``) are left out of the medians, and counted."""
    from bitpass.backends.tvm import TvmBackend

    if toggle:
        toggle_flag(toggle)  # a wrong name fails before the builds
    (name, model, feed, _), = _models(quick=True)
    x = {k: np.ascontiguousarray(np.repeat(v, batch, axis=0)) for k, v in feed.items()}
    backend = TvmBackend(batches=(batch,))
    resize = _threads_setter()
    samples: dict[tuple[str, int], dict[tuple[int, int], list[float]]] = {}
    labels: dict[tuple[int, int], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for side, flipped in (("TVM", False), *((("TVM*", True),) if toggle else ())):
            directory = Path(tmp) / side.replace("*", "_flipped")
            directory.mkdir()
            with _flipped(toggle if flipped else None):
                backend.emit(model, directory, backend.default_target)
            runners[side] = backend.load(directory, {}).model
        want = _ort_session_bytes(model.to_bytes(), 1).run(None, x)[0]
        for side, runner in runners.items():
            got = runner.run(x)[0]
            assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), f"{side}'s output is not ORT's"
        variants = [(side, n) for n in threads for side in (*runners, "ORT")]
        kept = 0
        for index in range(rounds):
            this: dict[tuple[str, int], dict[tuple[int, int], list[float]]] = {}
            for side, n in rotation(variants, index):
                if side in runners:
                    resize(n)
                    this[(side, n)] = tvm_conv_seconds(runners[side], x, batch, calls)
                else:  # a fresh session per round: its profile holds this round's calls only
                    this[(side, n)], labels = ort_conv_seconds(_ort_profiled(model.to_bytes(), n, Path(tmp)), x, calls)
            if not quiet_round(this, threads, min_speedup):
                continue
            kept += 1
            for variant, got in this.items():
                for key, values in got.items():
                    samples.setdefault(variant, {}).setdefault(key, []).extend(values)
        resize(max(threads))
    if not samples:
        raise RuntimeError(f"every one of {rounds} rounds ran on a shared machine (ORT's convs sped up less than "
                           f"{min_speedup}x from {min(threads)} to {max(threads)} threads): run it again when quiet")
    medians = {variant: {key: statistics.median(v) for key, v in per.items()} for variant, per in samples.items()}
    return {"model": name, "batch": batch, "threads": threads, "labels": labels, "seconds": medians,
            "sides": (*runners, "ORT"), "toggle": toggle, "rounds": rounds, "kept": kept, "min_speedup": min_speedup}


def quiet_round(seconds: dict[tuple[str, int], dict[Any, list[float]]], threads: tuple[int, ...],
                min_speedup: float) -> bool:
    """Whether a round ran with the cores to itself: ORT's convs (the reference) sped up at least ``min_speedup``
    times from the fewest to the most threads. On a shared machine another process holds a core for seconds at a
    time and the many-thread figures of that round fall to the one-thread ones."""
    lo, hi = min(threads), max(threads)
    if lo == hi:
        return True
    total = {n: sum(statistics.median(v) for v in seconds[("ORT", n)].values()) for n in (lo, hi)}
    return total[lo] >= min_speedup * total[hi]


@contextlib.contextmanager
def _flipped(name: str | None):
    """``name`` ("schedules.ONE_LAUNCH", a boolean of a ``bitpass.backends.tvm`` module) flipped while inside."""
    if name is None:
        yield
        return
    module, attr = toggle_flag(name)
    value = getattr(module, attr)
    setattr(module, attr, not value)
    try:
        yield
    finally:
        setattr(module, attr, value)


def toggle_flag(name: str) -> tuple[Any, str]:
    """The module of ``bitpass.backends.tvm`` and the boolean attribute ``name`` ("schedules.ONE_LAUNCH") names;
    ValueError saying what to give where it names none."""
    import importlib

    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(f"bitpass.backends.tvm.{module_name}") if module_name else None
    except ImportError:
        module = None
    if not isinstance(getattr(module, attr, None), bool):
        raise ValueError(f"--toggle {name}: not a boolean flag of a bitpass.backends.tvm module; give MODULE.FLAG, "
                         f"e.g. schedules.ONE_LAUNCH")
    return module, attr


def print_layers(result: dict[str, Any]) -> None:
    """Per conv: ms of each side at each thread count, each side's speed-up from the fewest to the most threads,
    and ORT's time over each TVM side's at the most threads."""
    print()
    lo, hi = min(result["threads"]), max(result["threads"])
    print_cpu(hi)
    sec, sides = result["seconds"], result["sides"]
    tvms = [s for s in sides if s != "ORT"]
    if result["toggle"]:
        print(f"TVM*: {result['toggle']} flipped")
    print(f"{result['kept']} of {result['rounds']} rounds kept (the others: ORT's convs sped up less than "
          f"{result['min_speedup']}x from {lo} to {hi} threads, the machine shared)")
    print(f"{result['model']} batch {result['batch']}: convs in the whole model, ms (medians); 'up': speed-up "
          f"{lo}->{hi} threads; ORT/TVM at {hi} threads >1: TVM faster")
    print(f"  {'conv (ORT shapes)':<30} " + " ".join(f"{f'{s} {n}':>8}" for n in (lo, hi) for s in sides)
          + "  " + " ".join(f"{'up ' + s:>8}" for s in sides) + "  " + " ".join(f"{'ORT/' + s:>8}" for s in tvms))
    totals = {v: 0.0 for v in sec}
    order = list(sec[("ORT", hi)])
    for key in sorted(result["labels"], key=order.index):
        if not all(key in per for per in sec.values()):
            continue
        t = {v: sec[v][key] for v in sec}
        for v in sec:
            totals[v] += t[v]
        _layer_row(f"{result['labels'][key]} #{key[1]}", t, sides, lo, hi)
    _layer_row("sum of convs", totals, sides, lo, hi)


def _layer_row(label: str, t: dict[tuple[str, int], float], sides, lo: int, hi: int) -> None:
    print(f"  {label:<30} " + " ".join(f"{t[(s, n)] * 1e3:8.3f}" for n in (lo, hi) for s in sides)
          + "  " + " ".join(f"{t[(s, lo)] / t[(s, hi)]:8.2f}" for s in sides)
          + "  " + " ".join(f"{t[('ORT', hi)] / t[(s, hi)]:8.2f}" for s in sides if s != "ORT"))

SECTIONS = ("kernels", "gemv", "models", "profile", "layers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="kernels, GEMV and ResNet-18 only")
    parser.add_argument("--batches", type=int, nargs="+", help="time only these of each model's batches")
    parser.add_argument("--only", nargs="+", choices=SECTIONS,
                        default=[s for s in SECTIONS if s not in ("profile", "layers")],
                        help="sections to run (profile and layers only when named)")
    parser.add_argument("--fp32-nchw", action="store_true",
                        help="models: also time TVM fp32 with NCHW activations between convs (the blocked "
                             "layout's A/B; short for --toggle lower.FP32_BLOCKED)")
    parser.add_argument("--toggle", metavar="MODULE.FLAG",
                        help="layers and models: also time a TVM fp32 build with this boolean of "
                             "bitpass.backends.tvm flipped (e.g. schedules.ROW_BANDED)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time rounds by wall time, or by the calling thread's CPU time (with --threads 1: "
                             "on a shared machine, leaves out the time other processes hold the core)")
    args = parser.parse_args(argv)
    try:
        use_clock(args.clock, args.threads)
    except ValueError as err:
        parser.error(str(err))
    if args.fp32_nchw:
        if args.toggle not in (None, "lower.FP32_BLOCKED"):
            parser.error("--fp32-nchw is --toggle lower.FP32_BLOCKED: give one flag to flip")
        args.toggle = "lower.FP32_BLOCKED"
    if args.toggle:
        try:
            toggle_flag(args.toggle)  # a wrong name fails before any build
        except ValueError as err:
            print(f"bench_tvm: {err}", file=sys.stderr)
            return 1
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    if "kernels" in args.only:
        print_convs(bench_convs(args.rounds, threads=args.threads), args.threads)
    if "gemv" in args.only:
        bandwidth = read_bandwidth()
        print_gemv(bench_gemv(args.threads, args.rounds), bandwidth, args.threads)
    if "profile" in args.only:
        print_profile(bench_profile(args.threads, args.rounds, tuple(args.batches) if args.batches else (1, 32)),
                      args.threads)
    if "layers" in args.only:
        try:
            print_layers(bench_layers(args.rounds, threads=(1, args.threads) if args.threads > 1 else (1,),
                                      toggle=args.toggle))
        except (ValueError, RuntimeError) as err:  # a wrong --toggle, or every round on a shared machine
            print(f"bench_tvm: {err}", file=sys.stderr)
            return 1
    if "models" in args.only:
        print_models(bench_models(args.threads, args.rounds, args.quick,
                                  tuple(args.batches) if args.batches else None, args.toggle), args.threads,
                     args.toggle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
