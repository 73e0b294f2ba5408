"""A bit plan becomes a graph: the one way per-layer widths and formats are materialized.

A plan says, per layer id, its weight bits, activation bits and weight format (``LayerPlan``);
without a plan, the layers' ``bits.*`` / ``format.weight`` annotations are the plan (unannotated
means 8/8). ``materialize`` turns it into a new ``Model``:

* 8 / 8 (``qdq``): static int8 QDQ from ONNX Runtime's ``quantize_static`` fed the calibrated
  ``ranges`` (``qdq.py``). Weights per-channel symmetric int8; activations int8 (S8S8) or uint8
  (U8S8) as ``options.activation_type`` says. Which one is fast and exact depends on the CPU
  (``int8_flavours.py``): the ``quantize`` pass measures them (``format_search.py``); called
  directly, ``auto`` means int8, which never saturates. Optional bias correction first.
* 2 or 4-bit weights in ``qdq`` (or ``dynamic``): stored as packed low-bit codes, widened to int8
  once at load by constant ops ORT folds (``packing.widen_int8_weight``): int8 compute at low-bit
  storage. The per-channel int8 scale is taken over the low-bit weight, so the int8 grid holds it.
* ``dynamic`` (MatMul / Gemm): ORT's dynamic quantization (``DynamicQuantizeLinear`` +
  ``MatMulInteger``, fused by ORT into ``DynamicQuantizeMatMul``): int8 weights, activations
  quantized at run time, no calibrated ranges. What ORT users run for BERT-class models.
* 32: left in fp32.
* 2 / 4 (and 8 with fp32 activations, i.e. weight-only) on MatMul / Gemm: ``MatMulNBits``; on Conv:
  4/8-bit blocked ``DequantizeLinear`` at opset 21 (``weight_only/rewrite.py``). The block size is the
  layer's ``format.block_size`` annotation, else ``options.block_size``.
* ``packed`` (any quantizable op, 2/4/8 bits): low-bit codes with fp16 block scales that constant
  ops unpack, folded by ONNX Runtime at session start (``packing.py``): low-bit size, fp32 speed.
* Anything else (2-bit Conv, which needs INT2 at opset 25; low-bit Gather/ConvTranspose; 3 or 16
  bits) is refused with an error naming the layer, before any work is done (``decide``).

Activation ranges are needed only when some layer becomes int8 QDQ. ORT drops node
``metadata_props``: every annotation is copied back onto the node of the same name (or, for nodes
ORT replaced, the node producing the same output), and int8 QDQ layers are stamped
``bits.weight=8`` / ``bits.activation=8``; every quantized layer gets its ``format.weight``.

Used by the ``quantize`` pass, the plan evaluator of ``allocate-bits``, joint allocation's measured
choice, and the ONNX Runtime backend's one-layer latency probe.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import pydantic

from bitpass.frontend import Dataset, Model, Provenance, annotation
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.frontend.layers import WEIGHT_INPUT
from bitpass.frontend.model import save_proto
from bitpass.passes import dynamic as dynamic_int8
from bitpass.passes import execution, int8_flavours, qdq
from bitpass.passes.analyses import ActivationRanges
from bitpass.passes.bias_correction import correct_biases
from bitpass.passes.infra import PassConfig
from bitpass.passes.opset import raise_opset, required_opset
from bitpass.passes.packing import PACKED_BITS, LowBitWeight, pack_weight, widen_int8_weight
from bitpass.passes.quant_scope import GraphFacts, detect_profile, layer_kept_float
from bitpass.passes.weight_only import rewrite as weight_only
from bitpass.passes.sensitivity.quant import layer_channel_axis

FLOAT_BITS = annotation.FLOAT_BITS
# what happens to a layer
FP32 = "fp32"
INT8_QDQ = "int8-qdq"
DYNAMIC = "dynamic"
MATMUL_NBITS = weight_only.MATMUL_NBITS
BLOCKED_DQ = weight_only.BLOCKED_DQ
PACKED = "packed"
#: the ``format.weight`` annotation each result is stamped with
FORMAT_OF = {INT8_QDQ: "qdq", DYNAMIC: "dynamic", MATMUL_NBITS: "matmulnbits", BLOCKED_DQ: "blocked-dq",
             PACKED: "packed"}
#: low weight widths int8 compute can hold (the codes are widened to int8 at load)
WIDENED_BITS = (2, 4)
#: ops whose int8 weight ``materialize`` can rebuild from low-bit storage
WIDENED_OPS = ("Conv", "Gemm", "MatMul")


class QuantizeOptions(PassConfig):
    """How layers are quantized (the ``quantize`` pass's options)."""

    per_channel: bool = True
    #: activation type of the int8 QDQ layers: auto (measured on the target by the quantize pass; int8
    #: when nothing is measured), int8 (S8S8) or uint8 (U8S8: fastest with VNNI, saturates on AVX2 without)
    activation_type: Literal["auto", "int8", "uint8"] = "auto"
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


@dataclass(frozen=True)
class LayerPlan:
    """What one layer should become: weight bits (32 = fp32), activation bits (None: 8), weight format."""

    weight_bits: int = 8
    activation_bits: int | None = None
    format: str | None = None
    #: weights per scale of a blocked format (None: the options' block size)
    block_size: int | None = None

    @classmethod
    def packed(cls, bits: int) -> LayerPlan:
        """``bits``-bit packed weights with fp32 activations (fp32 at 32 bits): what weight-only size plans use."""
        bits = int(bits)
        return cls(bits, FLOAT_BITS, PACKED if bits < FLOAT_BITS else None)


def packed_plan(bits: Mapping[str, int]) -> dict[str, LayerPlan]:
    """``{layer_id: bits}`` as a plan of packed weights."""
    return {layer_id: LayerPlan.packed(b) for layer_id, b in bits.items()}


@dataclass(frozen=True)
class Decision:
    """What ``materialize`` does to one layer, decided before any work."""

    layer_id: str
    node_name: str
    op_type: str
    weight_bits: int
    activation_bits: int | None
    result: str
    channel_axis: int = 0
    block_size: int | None = None
    #: why an 8-bit layer stays fp32 anyway (int8 QDQ's scope leaves its operator type float), else ""
    why: str = ""

    @property
    def widened(self) -> bool:
        """Int8 compute of low-bit storage: codes widened to int8 at load."""
        return self.result in (INT8_QDQ, DYNAMIC) and self.weight_bits in WIDENED_BITS


def annotate(model: Model, plan: Mapping[str, LayerPlan]) -> None:
    """Write ``plan`` onto the model's layers as annotations (layers not in it keep theirs)."""
    for layer in model.layers():
        entry = plan.get(layer.id)
        if entry is None:
            continue
        annotation.set_weight_bits(layer.node, entry.weight_bits)
        if entry.activation_bits is not None:
            annotation.set_activation_bits(layer.node, entry.activation_bits)
        if entry.format is not None:
            annotation.set_weight_format(layer.node, entry.format)
        if entry.block_size is not None:
            annotation.set_block_size(layer.node, entry.block_size)


def decide(model: Model) -> list[Decision]:
    """What each annotated layer becomes; every unsupported combination is refused here, before any work.

    An 8/8 layer whose operator type int8 QDQ's scope leaves float in this model's profile (an embedding
    lookup in a transformer, see ``quant_scope``) becomes fp32, with the reason."""
    decisions: list[Decision] = []
    problems: list[str] = []
    profile: str | None = None
    for layer in model.layers():
        wbits = annotation.weight_bits(layer.node)
        abits = annotation.activation_bits(layer.node)
        wbits = 8 if wbits is None else int(wbits)
        op = layer.op_type
        result = None
        fmt = annotation.weight_format(layer.node)
        if wbits == FLOAT_BITS:
            result = FP32
        elif fmt == PACKED:
            if wbits in PACKED_BITS and abits in (None, FLOAT_BITS):
                result = PACKED
            else:
                problems.append(f"layer {layer.id!r} ({op}): packed weights take {PACKED_BITS} bits with fp32 "
                                f"activations, not {wbits}/{abits}")
        elif abits not in (None, 8, FLOAT_BITS):
            problems.append(f"layer {layer.id!r} ({op}): {abits}-bit activations (supported: 8 or 32)")
        elif fmt == "dynamic":
            if op in ("MatMul", "Gemm") and wbits in (*WIDENED_BITS, 8):
                result = DYNAMIC
            else:
                problems.append(f"layer {layer.id!r} ({op}): dynamic int8 takes MatMul/Gemm layers with 2/4/8-bit "
                                f"weights, not {wbits}-bit {op}")
        elif fmt == "qdq" and wbits in WIDENED_BITS:
            if op in WIDENED_OPS and abits in (None, 8):
                result = INT8_QDQ
            else:
                problems.append(f"layer {layer.id!r} ({op}): int8 compute of {wbits}-bit weights takes "
                                f"{'/'.join(WIDENED_OPS)} layers with 8-bit activations, not {op} with {abits}")
        elif wbits == 8 and abits in (None, 8):
            result = INT8_QDQ
            if profile is None:
                profile = detect_profile(GraphFacts.from_graph(model.graph))[0]
            why = layer_kept_float(op, profile)
            if why is not None:
                decisions.append(Decision(layer.id, layer.node.name or "", op, FLOAT_BITS, FLOAT_BITS, FP32,
                                          layer_channel_axis(layer), why=f"{profile} int8 scope: {why}"))
                continue
        elif wbits in (2, 4, 8) and op in ("MatMul", "Gemm"):
            result = MATMUL_NBITS
        elif wbits in (4, 8) and op == "Conv" and layer.node.attributes.get_int("group", 1) == 1:
            result = BLOCKED_DQ
        else:
            why = {2: "2-bit Conv needs INT2 DequantizeLinear (opset 25)"}.get(wbits, "") if op == "Conv" else ""
            problems.append(f"layer {layer.id!r} ({op}): {wbits}-bit weights"
                            f"{' with fp32 activations' if abits == FLOAT_BITS else ''} are not "
                            f"supported{': ' + why if why else ''} (supported: 8-bit everywhere, 2/4/8-bit "
                            f"weight-only on MatMul/Gemm, 4/8-bit weight-only on Conv, 2/4-bit weights with "
                            f"int8 compute (format qdq) on Conv/MatMul/Gemm, 32 = fp32)")
        if result is not None:
            decisions.append(Decision(layer.id, layer.node.name or "", op, wbits, abits, result,
                                      layer_channel_axis(layer), annotation.block_size(layer.node)))
    if problems:
        raise BitpassError("cannot quantize: " + "; ".join(problems))
    return decisions


def materialize(model: Model, plan: Mapping[str, LayerPlan] | None = None, *,
                ranges: ActivationRanges | None = None, calibration: Dataset | None = None,
                options: QuantizeOptions | None = None,
                progress: Callable[[str], None] | None = None,
                details: dict[str, Any] | None = None) -> Model:
    """A new ``Model`` with ``plan`` (default: the layers' annotations) materialized; ``model`` is untouched.

    ``ranges`` are needed when some layer becomes int8 QDQ; ``calibration`` when
    ``options.bias_correction`` is on. Notes (e.g. skipped pre-processing) go to the provenance. When
    ``details`` is given, it receives ``int8_scope`` (which nodes int8 QDQ left float and why) and
    ``kept_float`` ({layer id: why} for layers that stayed fp32 although the plan said 8 bits)."""
    options = options or QuantizeOptions()
    say = progress or (lambda _message: None)
    if options.bias_correction and calibration is None:
        raise UsageError("quantize(bias_correction=true) needs calibration data to estimate layer input means")
    work = model.clone()
    if plan is not None:
        annotate(work, plan)
    name_nodes(work.ir.graph)
    decisions = decide(work)
    notes: list[str] = []
    need, why = required_opset(decisions)
    if need and work.opset < need:  # names and annotations survive the conversion
        before = work.opset
        raise_opset(work, need)
        notes.append(f"opset raised {before} -> {work.opset} for {why}")
    int8 = [d for d in decisions if d.result == INT8_QDQ]
    if int8 and ranges is None:
        raise BitpassError(f"int8 QDQ layers ({', '.join(d.layer_id for d in int8)}) need activation ranges: "
                           f"run calibrate first")
    originals = _annotations_by_node(work.ir.graph)
    excluded = sorted(d.node_name for d in decisions if d.result != INT8_QDQ)
    activation_type = "uint8" if options.activation_type == "uint8" else "int8"
    scope_record: dict[str, Any] | None = None

    with tempfile.TemporaryDirectory(prefix="bitpass-quant-") as tmp_dir, execution.quiet():
        tmp = Path(tmp_dir)
        current = tmp / "input.onnx"
        work.save(current)
        if options.preprocess:
            say("quantize: ORT pre-processing")
            current, note = qdq.preprocess(current, tmp, {d.node_name for d in decisions})
            if note:
                notes.append(note)
        low_bit: dict[str, LowBitWeight] = {}
        if any(d.widened for d in decisions):
            loaded = onnx.load(str(current))
            low_bit = _low_bit_weights(loaded, [d for d in decisions if d.widened], options.block_size)
            current = tmp / "low_bit.onnx"
            save_proto(loaded, current)
        if options.bias_correction and int8:
            say("quantize: bias correction")
            assert calibration is not None
            loaded = onnx.load(str(current))
            corrected = correct_biases(loaded, [d.node_name for d in int8], calibration,
                                       reduce_range=options.reduce_range)
            if corrected is not loaded:
                current = tmp / "bias_corrected.onnx"
                save_proto(corrected, current)
        if int8:
            say(f"quantize: int8 QDQ ({int8_flavours.flavour_of(activation_type, options.reduce_range).name}) on "
                f"{len(int8)} layer(s)")
            assert ranges is not None
            current, scope = qdq.quantize_int8(current, tmp / "qdq.onnx", ranges, excluded,
                                               per_channel=options.per_channel, reduce_range=options.reduce_range,
                                               activation_type=activation_type,
                                               symmetric_activations=options.symmetric_activations)
            scope_record = scope.record()
            if details is not None:
                details["int8_scope"] = scope_record
        proto = onnx.load(str(current))
    output_to_layer: dict[str, str] = {}
    dynamic = [d for d in decisions if d.result == DYNAMIC]
    if dynamic:
        say(f"quantize: dynamic int8 on {len(dynamic)} layer(s)")
        output_to_layer.update(dynamic_int8.quantize_layers(
            proto, [d.node_name for d in dynamic], per_channel=options.per_channel, reduce_range=options.reduce_range,
            low={d.node_name: low_bit[d.layer_id] for d in dynamic if d.widened}))
    weight_only_layers = [d for d in decisions if d.result in (MATMUL_NBITS, BLOCKED_DQ)]
    if weight_only_layers:
        say(f"quantize: weight-only on {len(weight_only_layers)} layer(s)")
        by_block: dict[int, list[Decision]] = {}
        for d in weight_only_layers:
            by_block.setdefault(d.block_size or options.block_size, []).append(d)
        with execution.quiet():
            for block, group in sorted(by_block.items()):
                proto, mapped = weight_only.rewrite(proto, group, block_size=block,
                                                    accuracy_level=options.accuracy_level,
                                                    symmetric=options.weight_only_symmetric)
                output_to_layer.update(mapped)
    initializers = {t.name for t in proto.graph.initializer}
    for decision in decisions:
        if decision.result == PACKED:
            node = next(n for n in proto.graph.node if n.name == decision.node_name)
            if node.input[WEIGHT_INPUT[decision.op_type]] not in initializers:
                # a weight this layer shares with a QDQ layer (a detector's heads) is already that layer's int8
                # DequantizeLinear: it reads that, and is not packed a second time
                say(f"quantize: {decision.layer_id} shares its weight with an int8 layer and reads that")
                continue
            pack_weight(proto, node, WEIGHT_INPUT[decision.op_type], decision.channel_axis, decision.weight_bits,
                        decision.block_size or options.block_size)
    for decision in decisions:
        if decision.widened and decision.result == INT8_QDQ:
            _widen(proto, decision, low_bit[decision.layer_id])

    ir_model = ir.serde.deserialize_model(proto)
    _restore_annotations(ir_model.graph, originals, output_to_layer)
    kept_float = {d.layer_id: d.why for d in decisions if d.why}
    scope_reasons = {k["node"]: k for k in _kept_nodes(scope_record)}
    for decision in decisions:
        node = _find(ir_model.graph, decision, output_to_layer)
        if node is None:
            raise BitpassError(f"quantize lost layer {decision.layer_id!r} (node {decision.node_name!r})")
        result = decision.result
        if result == INT8_QDQ and not _reads_dequantized_weight(node, decision.op_type):
            # the quantizer's scope left it float (a rule, or no calibrated range): say so, never claim int8
            kept = scope_reasons.get(decision.node_name)
            kept_float[decision.layer_id] = (f"int8 scope rule {kept['rule']}: {kept['why']}" if kept
                                             else "ONNX Runtime's quantizer left it float")
            result = FP32
        if result == FP32 and decision.layer_id in kept_float:
            annotation.set_weight_bits(node, FLOAT_BITS)
            annotation.set_activation_bits(node, FLOAT_BITS)
            annotation.delete(node, annotation.WEIGHT_FORMAT)
        if result in (INT8_QDQ, DYNAMIC):
            annotation.set_weight_bits(node, decision.weight_bits)
            annotation.set_activation_bits(node, 8)
        if result != FP32:
            annotation.set_weight_format(node, FORMAT_OF[result])
    if details is not None:
        details["kept_float"] = dict(sorted(kept_float.items()))
    provenance = Provenance(model.provenance.kind, model.provenance.name, model.provenance.sha256,
                            [*model.provenance.notes, *notes])
    return Model(ir_model, provenance, model.torch_module)


def _kept_nodes(scope: Mapping[str, Any] | None) -> list[dict[str, str]]:
    scope = scope or {}
    return [{"node": node, "rule": rule, "why": entry["why"]}
            for rule, entry in scope.get("kept_float", {}).items() for node in entry["nodes"]]


def _reads_dequantized_weight(node: ir.Node, op_type: str) -> bool:
    """Whether int8 QDQ reached ``node``: its weight input comes out of a DequantizeLinear."""
    index = WEIGHT_INPUT.get(op_type, 1)
    value = node.inputs[index] if len(node.inputs) > index else None
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _low_bit_weights(proto: onnx.ModelProto, widened: list[Decision], default_block: int) -> dict[str, LowBitWeight]:
    """Each widened layer's low-bit codes; its float weight is replaced by their values (after ORT's
    pre-processing, which may fuse into the weight), so that ORT's quantizers compute the per-channel int8
    scale over the low-bit weight and the int8 grid holds it exactly."""
    from onnx import numpy_helper

    out: dict[str, LowBitWeight] = {}
    inits = {t.name: t for t in proto.graph.initializer}
    for decision in widened:
        node = next((n for n in proto.graph.node if n.name == decision.node_name), None)
        if node is None:
            raise BitpassError(f"layer {decision.layer_id!r} (node {decision.node_name!r}) vanished before "
                               f"quantization")
        name = node.input[WEIGHT_INPUT[decision.op_type]]
        if name not in inits:
            raise BitpassError(f"layer {decision.layer_id!r}: int8 compute of {decision.weight_bits}-bit storage "
                               f"needs the weight as an initializer (run fold-constants first)")
        if decision.op_type == "Gemm" and any(a.name == "alpha" and a.f != 1.0 for a in node.attribute):
            raise BitpassError(f"layer {decision.layer_id!r}: int8 compute of low-bit storage takes Gemm with "
                               f"alpha=1 (use format packed)")
        low = LowBitWeight.of(numpy_helper.to_array(inits[name]).astype(np.float32), decision.channel_axis,
                              decision.weight_bits, decision.block_size or default_block)
        own = f"{name}__w{decision.weight_bits}"
        proto.graph.initializer.append(numpy_helper.from_array(low.dequantized(), own))
        node.input[WEIGHT_INPUT[decision.op_type]] = own
        out[decision.layer_id] = low
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return out


def _widen(proto: onnx.ModelProto, decision: Decision, low: LowBitWeight) -> None:
    """Replace the int8 weight ORT's quantizer wrote for a widened QDQ layer by the low-bit chain."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    node = next((n for n in proto.graph.node if n.name == decision.node_name), None)
    dq = producers.get(node.input[WEIGHT_INPUT[decision.op_type]]) if node is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        raise BitpassError(f"layer {decision.layer_id!r}: ONNX Runtime's quantizer did not give it an int8 "
                           f"weight, so its {decision.weight_bits}-bit storage cannot feed int8 compute")
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    _check_widened(proto, decision, low, dq.input[0], dq.input[1], axis)
    widen_int8_weight(proto, dq.input[0], low, dq.input[1], dq.input[2], axis)


def _check_widened(proto: onnx.ModelProto, decision: Decision, low: LowBitWeight, int8_name: str, scale_name: str,
                   axis: int) -> None:
    """The int8 weight ORT wrote must be the low-bit weight on the int8 grid: a pre-processing step that
    rewrote the weight (a fusion) would make the rebuilt weight wrong, so that is refused, not shipped."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    stored = numpy_helper.to_array(inits[int8_name]).astype(np.float64)
    scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
    if scale.size > 1:
        shape = [1] * stored.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    expected = np.rint(low.dequantized().astype(np.float64) / scale)
    if stored.shape != expected.shape or np.mean(np.abs(stored - expected) > 1) > 0.001:
        raise BitpassError(f"layer {decision.layer_id!r}: its int8 weight is not its {decision.weight_bits}-bit "
                           f"weight on the int8 grid (a pre-processing step changed it); use format packed")


def name_nodes(graph: ir.Graph) -> None:
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


def _annotations_by_node(graph: ir.Graph) -> dict[str, dict[str, str]]:
    return {node.name: dict(node.metadata_props) for node in graph if node.name and node.metadata_props}


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


def _find(graph: ir.Graph, decision: Decision, output_to_layer: dict[str, str]) -> ir.Node | None:
    for node in graph:
        if node.name == decision.node_name and node.op_type == decision.op_type:
            return node
    for node in graph:
        if node.outputs and output_to_layer.get(node.outputs[0].name or "") == decision.node_name:
            return node
    return None


__all__ = ["BLOCKED_DQ", "DYNAMIC", "FORMAT_OF", "FP32", "INT8_QDQ", "MATMUL_NBITS", "PACKED", "WIDENED_BITS",
           "Decision", "LayerPlan",
           "QuantizeOptions", "annotate", "decide", "materialize", "name_nodes", "packed_plan"]
