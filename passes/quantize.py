"""``quantize``: materialize the bits annotations with ONNX Runtime's quantizers.

Per layer (``bits.weight`` / ``bits.activation`` annotations; unannotated means 8/8):

* 8 / 8 (or unannotated): static int8 QDQ from ``onnxruntime.quantization.quantize_static``,
  fed our calibrated ``activation-ranges`` through its ``calibration_cache_path`` so ORT
  does not recalibrate. Weights per-channel symmetric int8; activations int8 (S8S8) by
  default, because on AVX2 without VNNI ORT's U8S8 path saturates (measured on the digits
  CNN: relative output error 0.11 for U8S8 against 0.014 for S8S8).
* 32: left in fp32 (``nodes_to_exclude``; ``nodes_to_include`` does not restrict).
* 2 / 4 (and 8 with ``bits.activation=32``, i.e. weight-only) on MatMul / Gemm:
  ``MatMulNBits`` from ORT's ``MatMulNBitsQuantizer`` (accuracy_level 4); a Gemm is first
  rewritten to MatMul + Add. On Conv: 4-bit (or weight-only 8-bit) blocked
  ``DequantizeLinear`` → Conv at opset 21, written here (ORT has no Conv weight-only quantizer).
* ``format.weight = packed`` (any quantizable op, 2/4/8 bits): the weight is stored as packed
  low-bit codes with fp16 block scales and rebuilt by constant ops that ONNX Runtime folds at
  session start (``passes/packing.py``): low-bit size, exactly fp32 speed.
* Anything else (2-bit Conv, which needs INT2 at opset 25; low-bit Gather/ConvTranspose;
  3 or 16 bits) is refused with an error naming the layer, before any work is done.

The pass is functional: it returns a new ``Model``. ORT drops node ``metadata_props``;
every annotation is copied back onto the node of the same name (or, for nodes ORT
replaced, the node producing the same output), and the layers that got int8 QDQ are
stamped ``bits.weight=8`` / ``bits.activation=8``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import pydantic
from onnx import helper, numpy_helper

from bitpass.frontend import Model, Provenance, annotation
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.frontend.layers import WEIGHT_INPUT, constant_tensor
from bitpass.passes.calibrate import ACTIVATION_RANGES, ActivationRanges
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.packing import PACKED_BITS, pack_weight
from bitpass.passes.sensitivity.quant import layer_channel_axis

QUANTIZED = "quantized"

# what happens to a layer
FP32 = "fp32"
INT8_QDQ = "int8-qdq"
MATMUL_NBITS = "matmulnbits"
BLOCKED_DQ = "blocked-dq"
PACKED = "packed"


_FORMATS = {INT8_QDQ: "qdq", MATMUL_NBITS: "matmulnbits", BLOCKED_DQ: "blocked-dq", PACKED: "packed"}


@dataclass(frozen=True)
class _Plan:
    layer_id: str
    node_name: str
    op_type: str
    weight_bits: int
    activation_bits: int | None
    result: str
    channel_axis: int = 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizers print and log warnings (pre-processing advice, opset bumps): keep them off the console."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Quantize(Pass):
    """Quantize to int8 QDQ (per-channel weights) with calibrated ranges; MatMulNBits / int4 for 2-4-bit layers."""

    name = "quantize"

    class Config(PassConfig):
        per_channel: bool = True
        #: activation type of the int8 QDQ layers: int8 (S8S8, default) or uint8 (U8S8, saturates on AVX2)
        activation_type: Literal["int8", "uint8"] = "int8"
        symmetric_activations: bool = False
        #: 7-bit weights (avoids U8S8 saturation on non-VNNI CPUs at some accuracy cost)
        reduce_range: bool = False
        #: correct each int8 layer's bias for the mean shift its weight rounding causes (needs calibration data)
        bias_correction: bool = False
        #: run ORT's quant_pre_process (shape inference + Conv/BN and similar fusions) first
        preprocess: bool = True
        #: block size of weight-only (2/4-bit) weights, along the reduction axis
        block_size: Literal[16, 32, 64, 128, 256] = 32
        #: MatMulNBits accuracy_level; 4 (int8 compute) is 100x faster for 2/8 bits than the default
        accuracy_level: int = pydantic.Field(4, ge=0, le=4)
        #: symmetric (zero-point-free) weight-only blocks
        weight_only_symmetric: bool = False

    requires = frozenset({ACTIVATION_RANGES})
    produces = frozenset({QUANTIZED})
    in_place = False

    # ------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        capabilities = (ctx.target.options or {}).get("capabilities")
        if getattr(capabilities, "lowers_bits", False):
            ctx.records["quantization"] = {"format": f"left to the {ctx.target.backend} backend, which lowers the "
                                                     f"bits annotations to its own kernels"}
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        if cfg.bias_correction and ctx.calibration is None:
            raise UsageError("quantize(bias_correction=true) needs calibration data to estimate layer input means")
        ranges: ActivationRanges = ctx.analyses.require(ACTIVATION_RANGES)
        if not isinstance(ranges, ActivationRanges):
            raise BitpassError(f"{ACTIVATION_RANGES} is a {type(ranges).__name__}, not bitpass ActivationRanges")

        work = model.clone()
        _name_nodes(work.ir.graph)
        plans = _plan(work)
        originals = _annotations_by_node(work.ir.graph)
        by_name = {p.node_name: p for p in plans}
        int8_names = [p.node_name for p in plans if p.result == INT8_QDQ]
        excluded = sorted(p.node_name for p in plans if p.result != INT8_QDQ)

        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.calibrate import save_tensors_data

        notes: list[str] = []
        with tempfile.TemporaryDirectory(prefix="bitpass-quant-") as tmp_dir, _quiet():
            tmp = Path(tmp_dir)
            current = tmp / "input.onnx"
            work.save(current)
            if cfg.preprocess:
                ctx.progress("quantize: ORT pre-processing")
                current, note = _preprocess(current, tmp, set(by_name))
                if note:
                    notes.append(note)
            if cfg.bias_correction and int8_names:
                ctx.progress("quantize: bias correction")
                current = _correct_biases(current, [p for p in plans if p.result == INT8_QDQ], ctx,
                                          cfg.reduce_range)
            if int8_names:
                ctx.progress(f"quantize: int8 QDQ on {len(int8_names)} layer(s)")
                cache = tmp / "ranges.json"
                save_tensors_data(ranges.to_tensors_data(), cache)
                activation = QuantType.QInt8 if cfg.activation_type == "int8" else QuantType.QUInt8
                output = tmp / "qdq.onnx"
                try:
                    quantize_static(
                        str(current), str(output), None, quant_format=QuantFormat.QDQ,
                        per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                        activation_type=activation, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=cache,
                        extra_options={"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": True,
                                       **_graph_output_ranges(work.ir.graph, ranges)},
                    )
                except Exception as err:
                    raise BitpassError(f"ONNX Runtime's int8 quantizer failed: {_first_line(err)}") from err
                current = output
            proto = onnx.load(str(current))
        low_bit = [p for p in plans if p.result in (MATMUL_NBITS, BLOCKED_DQ)]
        output_to_layer: dict[str, str] = {}
        if low_bit:
            ctx.progress(f"quantize: weight-only on {len(low_bit)} layer(s)")
            with _quiet():
                proto, output_to_layer = _weight_only(proto, low_bit, cfg)
        for plan in plans:
            if plan.result == PACKED:
                node = next(n for n in proto.graph.node if n.name == plan.node_name)
                pack_weight(proto, node, WEIGHT_INPUT[plan.op_type], plan.channel_axis, plan.weight_bits,
                            cfg.block_size)

        ir_model = ir.serde.deserialize_model(proto)
        _restore_annotations(ir_model.graph, originals, output_to_layer)
        for plan in plans:
            node = _find(ir_model.graph, plan, output_to_layer)
            if node is None:
                raise BitpassError(f"quantize lost layer {plan.layer_id!r} (node {plan.node_name!r})")
            if plan.result == INT8_QDQ:
                annotation.set_weight_bits(node, 8)
                annotation.set_activation_bits(node, 8)
            if plan.result != FP32:
                annotation.set_weight_format(node, _FORMATS[plan.result])
        provenance = Provenance(model.provenance.kind, model.provenance.name, model.provenance.sha256,
                                [*model.provenance.notes, *notes])
        result = Model(ir_model, provenance, model.torch_module)

        ctx.records["quantization"] = {
            "format": "QDQ",
            "weight_type": "int8",
            "activation_type": cfg.activation_type,
            "per_channel": cfg.per_channel,
            "symmetric_activations": cfg.symmetric_activations,
            "reduce_range": cfg.reduce_range,
            "bias_correction": cfg.bias_correction,
            "preprocessed": cfg.preprocess,
            "calibration_method": ranges.method,
            "weight_only": {"block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
                            "symmetric": cfg.weight_only_symmetric},
            "weight_bytes": {"before": model.weight_bytes(), "after": result.weight_bytes()},
            "notes": notes,
            "layers": {p.layer_id: {"op": p.op_type, "result": p.result if p.result != MATMUL_NBITS
                                    else f"matmulnbits-{p.weight_bits}",
                                    "weight_bits": p.weight_bits,
                                    "activation_bits": 8 if p.result == INT8_QDQ else p.activation_bits}
                       for p in plans},
        }
        return PassResult(result, modified=True, preserved=frozenset())


def _graph_output_ranges(graph: ir.Graph, ranges: ActivationRanges) -> dict[str, Any]:
    """ORT ``TensorQuantOverrides`` pinning graph outputs read by Relu/Clip to their own calibrated ranges.

    ORT's quantizer gives a Relu/Clip input the activation's output range when the activation is its
    only consumer (``adjust_tensor_ranges``) without checking that the input is also a graph output: a
    model returning a MatMul's result beside Relu(MatMul) got that output back with its negatives
    clipped to zero. Overrides win over that adjustment.
    """
    pinned = {}
    for output in graph.outputs:
        if output.name in ranges and any(use.node.op_type in ("Relu", "Clip") for use in output.uses()):
            lo, hi = ranges[output.name]
            pinned[output.name] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
    return {"TensorQuantOverrides": pinned} if pinned else {}


# ----------------------------------------------------------------------
# planning
def _name_nodes(graph: ir.Graph) -> None:
    """Give every node a unique name: ORT's quantizers select and report nodes by name."""
    taken: set[str] = set()
    for index, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{index}"
        candidate, suffix = name, 1
        while candidate in taken:
            suffix += 1
            candidate = f"{name}__{suffix}"
        node.name = candidate
        taken.add(candidate)


def _plan(model: Model) -> list[_Plan]:
    """What each layer becomes; every unsupported combination is refused here, before any work."""
    plans: list[_Plan] = []
    problems: list[str] = []
    for layer in model.layers():
        wbits = annotation.weight_bits(layer.node)
        abits = annotation.activation_bits(layer.node)
        wbits = 8 if wbits is None else int(wbits)
        op = layer.op_type
        result = None
        fmt = annotation.weight_format(layer.node)
        if wbits == annotation.FLOAT_BITS:
            result = FP32
        elif fmt == PACKED:
            if wbits in PACKED_BITS and abits in (None, annotation.FLOAT_BITS):
                result = PACKED
            else:
                problems.append(f"layer {layer.id!r} ({op}): packed weights take {PACKED_BITS} bits with fp32 "
                                f"activations, not {wbits}/{abits}")
        elif abits not in (None, 8, annotation.FLOAT_BITS):
            problems.append(f"layer {layer.id!r} ({op}): {abits}-bit activations (supported: 8 or 32)")
        elif wbits == 8 and abits in (None, 8):
            result = INT8_QDQ
        elif wbits in (2, 4, 8) and op in ("MatMul", "Gemm"):
            result = MATMUL_NBITS
        elif wbits in (4, 8) and op == "Conv" and layer.node.attributes.get_int("group", 1) == 1:
            result = BLOCKED_DQ
        else:
            why = {2: "2-bit Conv needs INT2 DequantizeLinear (opset 25)"}.get(wbits, "") if op == "Conv" else ""
            problems.append(f"layer {layer.id!r} ({op}): {wbits}-bit weights"
                            f"{' with fp32 activations' if abits == annotation.FLOAT_BITS else ''} are not "
                            f"supported{': ' + why if why else ''} (supported: 8-bit everywhere, 2/4/8-bit "
                            f"weight-only on MatMul/Gemm, 4/8-bit weight-only on Conv, 32 = fp32)")
        if result is not None:
            plans.append(_Plan(layer.id, layer.node.name or "", op, wbits, abits, result,
                               layer_channel_axis(layer)))
    if problems:
        raise BitpassError("cannot quantize: " + "; ".join(problems))
    return plans


def _annotations_by_node(graph: ir.Graph) -> dict[str, dict[str, str]]:
    return {node.name: dict(node.metadata_props) for node in graph if node.name and node.metadata_props}


# ----------------------------------------------------------------------
# ORT pre-processing
def _preprocess(path: Path, tmp: Path, layer_names: set[str]) -> tuple[Path, str | None]:
    """``quant_pre_process`` (symbolic shape inference skipped); without its optimizer if that renamed a layer."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "pre.onnx"
    try:
        quant_pre_process(str(path), str(out), skip_symbolic_shape=True)
        names = {n.name for n in onnx.load(str(out)).graph.node}
        if layer_names <= names:
            return out, None
        lost = sorted(layer_names - names)
        quant_pre_process(str(path), str(out), skip_symbolic_shape=True, skip_optimization=True)
        return out, f"quant_pre_process optimizer skipped: it would have merged layer node(s) {', '.join(lost)}"
    except Exception as err:  # pre-processing is an optimization: quantize the model as it is
        return path, f"quant_pre_process skipped: {_first_line(err)}"


# ----------------------------------------------------------------------
# bias correction
def _correct_biases(path: Path, plans: list[_Plan], ctx: PassContext, reduce_range: bool) -> Path:
    """Subtract (W_q - W) @ E[x] from each int8 layer's bias (Nagel et al., data-free quantization, sec. 4.2).

    E[x] per input channel is measured with ORT on the calibration data; W_q is the per-output-channel
    symmetric int8 rounding ORT applies. A layer without a bias gets no correction.
    """
    import onnxruntime as ort

    assert ctx.calibration is not None
    # on the pre-processed model: ORT rounds the weights it sees there (e.g. after Conv/BN folding)
    ir_model = ir.serde.deserialize_model(onnx.load(str(path)))  # no Model(): it would stamp annotations
    graph = ir_model.graph
    nodes = {n.name: n for n in graph}
    targets = []
    for plan in plans:
        node = nodes[plan.node_name]
        if len(node.inputs) < 3 or node.inputs[2] is None or constant_tensor(node.inputs[2]) is None:
            continue
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 1:
            continue
        if node.op_type not in ("Conv", "Gemm"):
            continue
        targets.append(node)
    if not targets:
        return path
    proto = ir.serde.serialize_model(ir_model)
    wanted = [n.inputs[0].name for n in targets]
    existing = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in existing:
            proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in ctx.calibration.batches(64):
        outs = session.run(list(dict.fromkeys(wanted)), batch)
        for name, value in zip(dict.fromkeys(wanted), outs):
            value = np.asarray(value, dtype=np.float64)
            axes = tuple(i for i in range(value.ndim) if i != 1)
            sums[name] = sums.get(name, 0) + value.sum(axis=axes)
            counts[name] = counts.get(name, 0) + int(np.prod([value.shape[i] for i in axes]))
    qmax = 63 if reduce_range else 127
    for node in targets:
        mean = sums[node.inputs[0].name] / counts[node.inputs[0].name]
        weight_value = node.inputs[1]
        w = constant_tensor(weight_value).numpy().astype(np.float64)
        flat = w.reshape(w.shape[0], -1)
        scale = np.abs(flat).max(axis=1) / qmax
        scale[scale == 0] = 1.0
        wq = (np.clip(np.round(flat / scale[:, None]), -qmax, qmax) * scale[:, None]).reshape(w.shape)
        delta = wq - w
        if node.op_type == "Conv":
            # E[x] per input channel, spatially uniform (ignores zero padding at the borders)
            shift = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2) @ mean \
                if delta.shape[1] == len(mean) else None
        else:
            shift = delta @ mean
        if shift is None:
            continue
        bias_value = node.inputs[2]
        bias = constant_tensor(bias_value).numpy().astype(np.float64)
        new = ir.tensor((bias - shift).astype(np.float32), name=bias_value.name)
        if bias_value.const_value is not None and len(bias_value.uses()) == 1:
            bias_value.const_value = new
        else:
            fresh = ir.Value(name=f"{bias_value.name}__bias_corrected", shape=bias_value.shape,
                             type=bias_value.type, const_value=ir.tensor(new.numpy(),
                                                                         name=f"{bias_value.name}__bias_corrected"))
            graph.register_initializer(fresh)
            node.replace_input_with(2, fresh)
    out = path.with_name("bias_corrected.onnx")
    onnx.save(ir.serde.serialize_model(ir_model), str(out))
    return out


# ----------------------------------------------------------------------
# weight-only low-bit
def _weight_only(proto: onnx.ModelProto, plans: list[_Plan], cfg: Any) -> tuple[onnx.ModelProto, dict[str, str]]:
    """MatMulNBits for MatMul/Gemm, blocked DequantizeLinear for Conv. Returns the model and
    {output tensor of the new node: original node name} for annotation restoring."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    output_to_layer: dict[str, str] = {}
    inits = {t.name: t for t in proto.graph.initializer}
    matmul_bits: dict[str, int] = {}
    matmul_out: dict[str, str] = {}
    for plan in plans:
        # Look the node up afresh: each rewrite rebuilds graph.node, detaching earlier NodeProto references.
        node = next((n for n in proto.graph.node if n.name == plan.node_name), None)
        if node is None:
            raise BitpassError(f"layer {plan.layer_id!r}: node {plan.node_name!r} vanished before weight-only "
                               f"quantization")
        if plan.result == MATMUL_NBITS:
            if node.op_type == "Gemm":
                node = _gemm_to_matmul_add(proto, node, inits)
            output_to_layer[node.output[0]] = plan.node_name
            matmul_bits[node.name] = plan.weight_bits
            matmul_out[node.name] = node.output[0]
        else:
            output_to_layer[node.output[0]] = plan.node_name
            _conv_blocked_dq(proto, node, inits, plan.weight_bits, cfg.block_size)
    if _opset(proto) < 21 and any(p.result == BLOCKED_DQ for p in plans):
        raise BitpassError("blocked int4 DequantizeLinear needs opset 21; the model is at opset "
                           f"{_opset(proto)}")
    all_matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    for bits in sorted(set(matmul_bits.values())):
        chosen = {name for name, b in matmul_bits.items() if b == bits}
        try:
            quantizer = mnb.MatMulNBitsQuantizer(
                proto, bits=bits, block_size=cfg.block_size, is_symmetric=cfg.weight_only_symmetric,
                accuracy_level=cfg.accuracy_level or None, op_types_to_quantize=("MatMul",),
                nodes_to_exclude=[n for n in all_matmuls if n not in chosen],
            )
            quantizer.process()
        except Exception as err:
            raise BitpassError(f"ONNX Runtime's MatMulNBits quantizer failed ({bits}-bit, "
                               f"{', '.join(sorted(chosen))}): {_first_line(err)}") from err
        proto = quantizer.model.model
        produced = {n.output[0] for n in proto.graph.node if n.op_type == "MatMulNBits"}
        missing = sorted(name for name in chosen if matmul_out[name] not in produced)
        if missing:
            raise BitpassError(f"MatMulNBits did not quantize {', '.join(missing)} ({bits}-bit): the weight must "
                               f"be a constant 2-D tensor")
    return proto, output_to_layer


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _gemm_to_matmul_add(proto: onnx.ModelProto, node: onnx.NodeProto,
                        inits: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    """Rewrite a Gemm with constant B in place as MatMul (named after the Gemm) + Add."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        raise BitpassError(f"Gemm {node.name!r} with transA cannot become MatMulNBits")
    weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if attrs.get("transB", 0):
        weight = weight.T
    weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0)))
    base = node.name
    weight_name = f"{node.input[1]}__matmul"
    proto.graph.initializer.append(numpy_helper.from_array(weight, weight_name))
    inits[weight_name] = proto.graph.initializer[-1]
    output = node.output[0]
    matmul = helper.make_node("MatMul", [node.input[0], weight_name], [f"{output}__matmul"], name=base)
    replacement = [matmul]
    if len(node.input) > 2 and node.input[2]:
        bias_name = node.input[2]
        beta = float(attrs.get("beta", 1.0))
        if beta != 1.0:
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32) * np.float32(beta)
            bias_name = f"{bias_name}__beta"
            proto.graph.initializer.append(numpy_helper.from_array(bias, bias_name))
        replacement.append(helper.make_node("Add", [matmul.output[0], bias_name], [output], name=f"{base}/bias"))
    else:
        matmul.output[0] = output
    nodes = list(proto.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == node.name)
    nodes[index : index + 1] = replacement
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return matmul


def _conv_blocked_dq(proto: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                     bits: int, block_size: int) -> None:
    """Conv weight → int4/int8 [O, I*kh*kw] blocked along axis 1, DequantizeLinear, Reshape back."""
    name = node.input[1]
    weight = numpy_helper.to_array(inits[name]).astype(np.float32)
    out_ch = weight.shape[0]
    flat = weight.reshape(out_ch, -1)
    k = flat.shape[1]
    blocks = math.ceil(k / block_size)
    padded = np.zeros((out_ch, blocks * block_size), np.float32)
    padded[:, :k] = flat
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(padded.reshape(out_ch, blocks, block_size)).max(axis=2) / qmax
    scale[scale == 0] = 1.0
    q = np.clip(np.round(padded.reshape(out_ch, blocks, block_size) / scale[:, :, None]), -qmax - 1, qmax)
    q = q.reshape(out_ch, -1)[:, :k]
    dtype = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    prefix = f"{name}_DQ_Q{bits}"
    if bits == 4:
        q_tensor = helper.make_tensor(prefix, dtype, q.shape, q.astype(np.int8).flatten().tolist())
    else:
        q_tensor = numpy_helper.from_array(q.astype(np.int8), prefix)
    scale_tensor = numpy_helper.from_array(scale.astype(np.float32), f"{prefix}_scales")
    shape_tensor = numpy_helper.from_array(np.array(weight.shape, dtype=np.int64), f"{prefix}_shape")
    proto.graph.initializer.extend([q_tensor, scale_tensor, shape_tensor])
    dq_attrs: dict[str, Any] = {"axis": 1}
    if blocks > 1 or bits == 4:
        dq_attrs["block_size"] = block_size
    dq = helper.make_node("DequantizeLinear", [prefix, f"{prefix}_scales"], [f"{prefix}_flat"],
                          name=f"{node.name}/weight_dq", **dq_attrs)
    reshape = helper.make_node("Reshape", [f"{prefix}_flat", f"{prefix}_shape"], [f"{prefix}_weight"],
                               name=f"{node.name}/weight_reshape")
    node.input[1] = f"{prefix}_weight"
    nodes = list(proto.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == node.name)
    nodes[index:index] = [dq, reshape]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    still_used = any(name in n.input for n in proto.graph.node)
    if not still_used:
        proto.graph.initializer.remove(inits.pop(name))


# ----------------------------------------------------------------------
# annotations
def _restore_annotations(graph: ir.Graph, originals: dict[str, dict[str, str]],
                         output_to_layer: dict[str, str]) -> None:
    """Copy each original node's metadata (bitpass annotations included) onto its quantized counterpart."""
    for node in graph:
        source = originals.get(node.name or "")
        if source is None and node.outputs and node.outputs[0].name in output_to_layer:
            source = originals.get(output_to_layer[node.outputs[0].name])
        if not source:
            continue
        for key, value in source.items():
            if key.startswith(annotation.PREFIX) or key not in node.metadata_props:
                node.metadata_props[key] = value


def _find(graph: ir.Graph, plan: _Plan, output_to_layer: dict[str, str]) -> ir.Node | None:
    for node in graph:
        if node.name == plan.node_name and node.op_type == plan.op_type:
            return node
    for node in graph:
        if node.outputs and output_to_layer.get(node.outputs[0].name or "") == plan.node_name:
            return node
    return None
