"""Lower bitpass's annotated IR (ONNX) to a Relax module, one function per batch size.

Every node is visited in order; values are either numpy constants (initializers and everything computed
from them alone, shapes included: the batch is fixed per function, so shape arithmetic folds, by the
rules below or ONNX's reference evaluator) or Relax expressions. Conv, Gemm and MatMul with a constant
weight become bitpass's own kernels (``kernels.py``) at the precision their annotations ask for, with a
following Relu, or a residual Add and Relu, fused into the kernel; the common operators have rules here
(``op_*``), and every other operator is converted by TVM's own Relax ONNX importer, one node at a time
(``imported``), legalized and scheduled by TVM's defaults plus ``schedules.py``. Where the target's scheme
says so (VNNI), an int8 conv read by another int8 conv (directly, or through a max pooling of non-negative
values whose windows cover every pixel) passes it its output's per-sample absmax, so the reader skips its own
pass over the input; the codes are the same (max is exact), so are the outputs. There, too, a max pooling
that alone reads an int8 conv's output runs in the conv's epilogue, as it does after an fp32 conv from batch
``kernels.POOL_MIN_TASKS`` on (``_fused_pool``). On AVX-512 (``Scheme.fp32_block``) an fp32 conv whose readers are
fp32 convs, a max pooling of it or a residual Add another fp32 conv fuses writes blocked NCHW16c activations, as ORT
does, and they read them so (``Blocked``); any other reader gets NCHW. Not the importer for
the whole graph: it cannot take the dynamic-batch flatten torch exports (Shape → Squeeze → Concat →
Reshape), and it would hide the per-layer annotations.

``check`` runs the same lowering without building, to say which nodes cannot run and why (what TVM's
importer or its operator legalization refused), before anything is compiled.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bitpass.backends.tvm import kernels
from bitpass.backends.tvm.kernel_attrs import KernelAttrs
from bitpass.backends.tvm.legalize import register_missing
from bitpass.frontend import Model, annotation

#: the op types with a kernel: constant-weight Conv, Gemm and MatMul
KERNEL_OPS = ("Conv", "Gemm", "MatMul")

#: weight widths per quantizable op the kernels implement (32 = fp32)
WEIGHT_BITS = {"Conv": (8, 32), "Gemm": (4, 8, 32), "MatMul": (4, 8, 32)}

INT4_BLOCK = 32

#: how each node was lowered, for the manifest: a bitpass kernel, a rule of this module, or TVM's importer
BITPASS_KERNEL, BITPASS_RULE, TVM_IMPORTER, FOLDED = "bitpass kernel", "bitpass rule", "tvm importer", "folded"


@dataclass(frozen=True)
class NodePlan:
    """What the annotations ask of one node (read through ``bitpass.frontend.annotation``)."""

    layer_id: str | None = None
    weight_bits: int = annotation.FLOAT_BITS


def plans_of(model: Model) -> list[NodePlan]:
    """One plan per top-level node of ``model``, in graph order (the order ``Model.to_proto`` writes)."""
    return [NodePlan(annotation.layer_id(node), annotation.weight_bits(node) or annotation.FLOAT_BITS)
            for node in model.graph]


@dataclass
class Codes:
    """An activation kept as uint8 codes between int8 convs (VNNI, calibrated): ``words`` is the Relax tensor
    (``avx512.u8_shape``: uint8 channels-last, a border of code 0) standing for the NCHW fp32 tensor of
    ``shape`` ≈ code · ``scale``. A node that cannot read codes gets ``decoded`` fp32, made once."""

    words: Any
    shape: list[int]
    scale: float
    decoded: Any = None


@dataclass
class ChannelsLast:
    """An activation ``tensor`` stored [N, H, W, C] for the NCHW ``shape``: a conv without a ReLU whose output is
    the residual input of an int8 conv writing codes (whose epilogue reads 16 channels at once); signed int8
    codes of ``scale`` where calibrated, else fp32 (``scale`` None)."""

    tensor: Any
    shape: list[int]
    scale: float | None = None
    decoded: Any = None


@dataclass
class Blocked:
    """An fp32 activation ``tensor`` stored blocked NCHW{block}c, [N, C/block, H, W, block], for the NCHW ``shape``:
    written by an fp32 conv (or a max pooling of one) whose readers are fp32 convs, max poolings and residual Adds
    (``_blocked_readers``), as ORT keeps fp32 activations between convs on AVX-512; any other reader gets it
    ``decoded`` to NCHW, once. ``halo``: pixels of zeros around each plane, [N, C/block, H + 2·halo, W + 2·halo,
    block] (``_halo_readers``): a conv with that much padding reads it in place, with no padding stage."""

    tensor: Any
    shape: list[int]
    block: int
    decoded: Any = None
    halo: int = 0


#: fp32 convs pass each other blocked (NCHWc) activations where the scheme has a block (``Blocked``); False: NCHW
#: everywhere, for timing one against the other
FP32_BLOCKED = True
#: a blocked activation whose readers all take it so carries ``HALO`` pixels of zeros around each plane, written by
#: its writer (``blocked.conv2d``, the blocked max pooling), so a 3×3 conv reads it without a padding stage and the
#: barrier after it; False: no border, for timing one against the other
FP32_HALO = True
HALO = 1
#: 3×3 stride-1 fp32 convs between blocked activations whose output 4×4 or 2×2 tiles cover run Winograd's algorithm
#: (``winograd.supported``, partial tiles only with ``winograd.PARTIAL_TILES``); False: the direct conv, for timing
#: one against the other
WINOGRAD = True


def _layout(block: int, halo: int) -> str:
    """An fp32 activation's layout as the manifest names it."""
    if not block:
        return "float32"
    return f"float32 NCHW{block}c" + (f", {halo}-pixel zero border" if halo else "")


@dataclass
class LoweringReport:
    """What each layer became (kernel and width) and how every other node was lowered, for the manifest."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    weight_bytes: int = 0
    #: op type -> {how it was lowered -> nodes}
    ops: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, op: str, how: str) -> None:
        per_op = self.ops.setdefault(op, {})
        per_op[how] = per_op.get(how, 0) + 1


@dataclass(frozen=True)
class Problem:
    """A node the lowering cannot run: its op type, name and the reason TVM gave."""

    op: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"operator {self.op} (node {self.node!r}) cannot run on TVM: {self.reason}"


class LoweringError(NotImplementedError):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "^")):
            return line[:300]
    return type(err).__name__


class _Lowering:
    def __init__(self, proto: onnx.ModelProto, plans: Sequence[NodePlan], scheme: kernels.Scheme,
                 report: LoweringReport, ranges: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.proto = proto
        #: calibrated (lo, hi) per tensor name: where present, int8 convs pass each other uint8 codes (``Codes``)
        self.ranges = dict(ranges or {})
        self.scheme = scheme
        self.lanes = scheme.lanes
        self.report = report
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        #: the nodes, held: protobuf may hand out a new wrapper per access, and ids below must stay valid
        self.nodes = list(proto.graph.node)
        self.plans = {id(node): plan for node, plan in zip(self.nodes, plans)}
        #: no layer below 32 bits: Winograd's transformed weights (up to 4× the bytes) may be stored. A mixed or
        #: quantized plan was sized by its allocation with fp32 weights at 4 bytes each, so it keeps the direct conv
        self.fp32_plan = all(plan.weight_bits >= annotation.FLOAT_BITS for plan in plans)
        self.inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer = {name: node for node in self.nodes for name in node.output if name}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in proto.graph.output}
        self._weights: dict[tuple, Any] = {}  # packed weight constants shared between functions
        self.env: dict[str, Any] = {}
        self.fused: set[int] = set()  # id() of nodes folded into a kernel's epilogue
        self._alias: list[str] = []  # outputs of fused nodes that are the current kernel's output
        #: value name -> its absmax slots (a Relax [N, P] fp32: ``kernels.block_row_absmax``), where the int8 conv
        #: that wrote it took them
        self.absmax: dict[str, Any] = {}
        self.nonnegative: set[str] = set()  # values known ≥ 0 (a fused ReLU) among those with an absmax
        self._absmax: Any = None  # the current node's output's absmax, if it has one
        self._nonnegative = False
        #: for ``check``: continue past failing nodes, collecting what TVM refused
        self.collect: list[Problem] | None = None
        self.value_info: dict[str, onnx.ValueInfoProto] = {}  # inferred types (``check``'s placeholders)

    def plan(self, node: onnx.NodeProto) -> NodePlan:
        return self.plans.get(id(node), NodePlan())

    # --- helpers -------------------------------------------------------------------------
    def const(self, array: np.ndarray):
        from tvm import relax

        array = np.asarray(array)
        # keeps 0-d arrays 0-d; the dtype is explicit because TVM 0.27's relax.const makes a 0-d int64 array int32
        # (RoBERTa's position ids then failed: "int64 on the LHS ... int32 on the RHS")
        return relax.const(array if array.flags.c_contiguous else array.copy(), str(array.dtype))

    def shared(self, key: tuple, make):
        if key not in self._weights:
            self._weights[key] = make()
        return self._weights[key]

    def expr(self, value):
        if isinstance(value, np.ndarray):
            return self.const(value)
        return value

    def shape_of(self, value) -> list[int]:
        if isinstance(value, (Codes, ChannelsLast, Blocked)):
            return list(value.shape)
        if isinstance(value, np.ndarray):
            return list(value.shape)
        return [int(d) for d in value.ty.shape]

    @staticmethod
    def dtype_of(value) -> str:
        if isinstance(value, (Codes, ChannelsLast, Blocked)):
            return "float32"
        if isinstance(value, np.ndarray):
            return str(value.dtype)
        return str(value.ty.dtype)

    # --- the function ----------------------------------------------------------------------
    def params(self, batch: int) -> list[Any]:
        """Relax parameters for the graph's inputs: a symbolic leading dimension is the batch; any other
        symbolic dimension cannot be compiled ahead of time."""
        from tvm import relax

        params = []
        for inp in self.proto.graph.input:
            if inp.name in self.inits:
                continue
            dims = []
            for axis, d in enumerate(inp.type.tensor_type.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(d.dim_value)
                elif axis == 0:
                    dims.append(batch)
                else:
                    raise LoweringError(Problem("input", inp.name, f"dimension {axis} is symbolic "
                                                f"({d.dim_param or '?'}); TVM artifacts are compiled for fixed "
                                                f"shapes: export the model with a fixed size on that axis"))
            params.append(relax.Var(inp.name, relax.TensorType(dims, str(_np_dtype(inp.type.tensor_type.elem_type)))))
        return params

    def function(self, bb, batch: int, name: str) -> None:
        """Emit one Relax function for inputs whose symbolic (batch) dimensions are ``batch``."""
        from tvm import relax

        params = self.params(batch)
        self.env = dict(self.inits)
        self.env.update({str(p.name): p for p in params})
        self.fused = set()
        self.absmax, self.nonnegative = {}, set()
        with bb.function(name, params):
            with bb.dataflow():
                for node in self.nodes:
                    if id(node) in self.fused:
                        continue
                    self.lower_node(bb, node)
                results = [self.expr(self.fp32(bb, self.env[o.name])) for o in self.proto.graph.output]
                out = bb.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
            bb.emit_func_output(out)

    def lower_node(self, bb, node: onnx.NodeProto) -> None:
        self._alias = []
        self._how: str | None = None
        self._absmax, self._nonnegative = None, False
        inputs = [self.env.get(i) if i else None for i in node.input]
        # codes go only to a conv's data input (it decides), blocked activations also to a max pooling's; everything
        # else reads them decoded
        inputs = [v if k == 0 and (node.op_type == "Conv" or node.op_type == "MaxPool" and isinstance(v, Blocked))
                  else self.fp32(bb, v) for k, v in enumerate(inputs)]
        missing = [i for i, v in zip(node.input, inputs) if i and v is None]
        if missing:  # only after a failed node, in ``check``
            raise LoweringError(Problem(node.op_type, node.name, f"input {missing[0]!r} was not computed"))
        try:
            outs = self.node(bb, node, inputs)
        except LoweringError as err:
            if self.collect is None:
                raise
            self.collect.append(err.problem)
            self._placeholders(node)
            return
        except Exception as err:  # noqa: BLE001 - TVM raises its own error types; say which node
            problem = Problem(node.op_type, node.name, first_line(err))
            if self.collect is None:
                raise LoweringError(problem) from err
            self.collect.append(problem)
            self._placeholders(node)
            return
        for out_name, value in zip(node.output, outs):
            self.env[out_name] = value
        layer = self.plan(node).layer_id
        if layer is not None and layer not in self.report.layers:  # a layer without a bitpass kernel
            self.report.layers[layer] = {"node": node.name, "lowering": self._how, "kernel": None,
                                         "weight_bits": annotation.FLOAT_BITS}
        for alias in self._alias:  # a fused Relu's / Add's output is the kernel's output
            self.env[alias] = outs[0]
        if self._absmax is not None:
            for name in (node.output[0], *self._alias):
                self.absmax[name] = self._absmax
                if self._nonnegative:
                    self.nonnegative.add(name)

    def fp32(self, bb, value):
        """``value`` as an fp32 NCHW tensor: codes decoded, channels-last and blocked transposed (once per value),
        anything else as it is."""
        if isinstance(value, Blocked):
            if value.decoded is None:
                from tvm import relax

                n, c, h, w = value.shape
                inner = value.tensor
                if value.halo:  # the plane without its border
                    e = value.halo
                    inner = bb.emit(relax.op.strided_slice(inner, [2, 3], [e, e], [h + e, w + e]))
                split = bb.emit(relax.op.permute_dims(inner, [0, 1, 4, 2, 3]))
                value.decoded = bb.emit(relax.op.reshape(split, [n, c, h, w]))
            return value.decoded
        if isinstance(value, ChannelsLast):
            if value.decoded is None:
                from tvm import relax

                nchw = bb.emit(relax.op.permute_dims(value.tensor, [0, 3, 1, 2]))
                if value.scale is not None:
                    nchw = bb.emit(relax.op.multiply(relax.op.astype(nchw, "float32"),
                                                     self.const(np.array(value.scale, np.float32))))
                value.decoded = nchw
            return value.decoded
        if not isinstance(value, Codes):
            return value
        if value.decoded is None:
            from tvm import te, tirx

            from bitpass.backends.tvm import avx512

            pad, scale = avx512.U8_PAD, value.scale

            def te_decode(codes):
                return te.compute(value.shape, lambda b, c, y, x: tirx.Cast("float32", codes[b, y + pad, x + pad, c])
                                  * tirx.const(scale, "float32"), name="decode_codes")

            value.decoded = bb.emit_te(te_decode, value.words, primfunc_name_hint="bitpass_decode_codes")
        return value.decoded

    def _placeholders(self, node: onnx.NodeProto) -> None:
        """``check`` goes on past a failing node with free variables of its outputs' inferred types."""
        from tvm import relax

        for name in node.output:
            info = self.value_info.get(name)
            if info is None:
                continue
            ttype = info.type.tensor_type
            if not ttype.HasField("shape") or any(not d.HasField("dim_value") for d in ttype.shape.dim[1:]):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else 1 for d in ttype.shape.dim]
            self.env[name] = relax.Var(name, relax.TensorType(dims, str(_np_dtype(ttype.elem_type))))

    def _single_consumer(self, value: str) -> onnx.NodeProto | None:
        users = self.consumers.get(value, [])
        if len(users) == 1 and value not in self.graph_outputs:
            return users[0]
        return None

    def node(self, bb, node: onnx.NodeProto, inputs: list[Any]) -> list[Any]:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return self.imported(bb, node, inputs)
        attrs = _attrs(node)
        if op == "CastLike" and isinstance(inputs[0], np.ndarray):  # only the dtype of the second is read
            self.mark(node, FOLDED)
            return [inputs[0].astype(self.dtype_of(inputs[1]))]
        if all(isinstance(v, np.ndarray) or v is None for v in inputs) and op not in KERNEL_OPS:
            folded = self.fold(node, attrs, inputs)
            if folded is None:
                folded = self.evaluate(node, inputs)
            if folded is not None:
                self.mark(node, FOLDED)
                return [np.asarray(v) for v in folded]  # numpy scalars (a 0-d Gather) stay constants too
        method = getattr(self, f"op_{op}", None)
        if method is None:
            return self.imported(bb, node, inputs)
        result = method(bb, node, attrs, inputs)
        if self._how is None:
            self.mark(node, BITPASS_RULE)
        return result if isinstance(result, list) else [result]

    def mark(self, node: onnx.NodeProto, how: str) -> None:
        """Record how ``node`` was lowered (a bitpass kernel or rule, TVM's importer, folded)."""
        self._how = how
        self.report.count(node.op_type, how)

    # --- TVM's importer for everything else ----------------------------------------------------
    def imported(self, bb, node: onnx.NodeProto, inputs: list[Any]) -> list[Any]:
        """Convert ``node`` with TVM's Relax ONNX importer: a one-node ONNX model (constant inputs as
        initializers, the others as inputs of their Relax types) imported to a private Relax function,
        called here and inlined after lowering (``InlinePrivateFunctions``)."""
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        graph_inputs, initializers, args, shapes, dtypes = [], [], [], {}, {}
        for name, value in zip(node.input, inputs):
            if not name or any(i.name == name for i in graph_inputs) or any(t.name == name for t in initializers):
                continue
            if isinstance(value, np.ndarray):
                initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
                continue
            dtype, shape = self.dtype_of(value), self.shape_of(value)
            graph_inputs.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
            shapes[name], dtypes[name] = shape, dtype
            args.append(value)
        outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
        graph = onnx.helper.make_graph([node], f"{node.op_type}_node", graph_inputs, outputs, initializers)
        opsets = [onnx.helper.make_opsetid(o.domain, o.version) for o in self.proto.opset_import]
        one = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=self.proto.ir_version)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = from_onnx(one, shape_dict=shapes, dtype_dict=dtypes, sanitize_input_names=False)
            except Exception as err:  # noqa: BLE001 - the importer raises many types
                raise LoweringError(Problem(node.op_type, node.name, f"TVM's ONNX importer: {first_line(err)}")) \
                    from err
        func = mod["main"]
        func = func.without_attr("global_symbol").without_attr("num_input") if func.attrs is not None else func
        for gvar in mod.functions:
            if gvar.name_hint != "main":
                raise LoweringError(Problem(node.op_type, node.name, "TVM's ONNX importer made more than one function"))
        missing = unimplemented_ops(func)
        if missing:
            raise LoweringError(Problem(node.op_type, node.name, f"TVM has no implementation of {', '.join(missing)} "
                                        f"(its importer converts the node, its operator legalization does not)"))
        self.mark(node, TVM_IMPORTER)
        gv = bb.add_func(func, f"onnx_{node.op_type.lower()}")
        result = bb.emit(relax.Call(gv, args))
        wanted = [o for o in node.output]
        if isinstance(result.ty, relax.TupleType):
            items = [bb.emit(relax.TupleGetItem(result, i)) for i in range(len(result.ty.fields))]
            return items[:len(wanted)]
        return [result]

    # --- constant folding (numpy) --------------------------------------------------------
    def evaluate(self, node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
        """Any operator on constant inputs, by ONNX's reference evaluator (None when it cannot)."""
        from onnx.reference import ReferenceEvaluator

        feeds = {name: value for name, value in zip(node.input, inputs) if name}
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its failures as well as raising them
                evaluator = ReferenceEvaluator(node, opsets={o.domain: o.version for o in self.proto.opset_import})
                results = evaluator.run(None, feeds)
        except Exception:  # noqa: BLE001 - an operator the evaluator lacks: lowered as usual
            return None
        return [np.asarray(r) for r in results]

    def fold(self, node, attrs, inputs) -> list[np.ndarray] | None:
        op = node.op_type
        x = inputs[0] if inputs else None
        if op == "Constant":
            return [numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.array(
                attrs.get("value_ints", attrs.get("value_int", attrs.get("value_floats", attrs.get("value_float")))))]
        if op == "Identity":
            return [x]
        if op == "Squeeze":
            axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
            return [np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)]
        if op == "Unsqueeze":
            axes = inputs[1] if len(inputs) > 1 else attrs["axes"]
            out = x
            for a in sorted(int(v) % (x.ndim + len(axes)) for v in axes):
                out = np.expand_dims(out, a)
            return [out]
        if op == "Concat":
            return [np.concatenate([np.atleast_1d(v) for v in inputs], axis=attrs["axis"])]
        if op == "Gather":
            return [np.take(x, inputs[1], axis=attrs.get("axis", 0))]
        if op == "Cast":
            return [x.astype(_np_dtype(attrs["to"]))]
        if op == "Reshape":
            return [x.reshape(self._reshape_target(list(x.shape), inputs[1], attrs))]
        if op == "Transpose":
            return [np.transpose(x, attrs.get("perm"))]
        if op in ("Add", "Sub", "Mul", "Div"):
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
            out = fn(inputs[0], inputs[1])
            if op == "Div" and inputs[0].dtype.kind == "i":
                out = np.floor_divide(inputs[0], inputs[1])
            return [out.astype(inputs[0].dtype)]
        if op == "Shape":
            return [np.array(x.shape, np.int64)[attrs.get("start", 0):attrs.get("end", None)]]
        return None

    @staticmethod
    def _reshape_target(shape: list[int], target, attrs) -> list[int]:
        target = [int(v) for v in np.asarray(target).ravel()]
        out = []
        for i, v in enumerate(target):
            out.append(shape[i] if v == 0 and not attrs.get("allowzero", 0) else v)
        if -1 in out:
            known = int(np.prod([v for v in out if v != -1]))
            out[out.index(-1)] = int(np.prod(shape)) // max(known, 1)
        return out

    # --- shapes ----------------------------------------------------------------------------
    def op_Shape(self, bb, node, attrs, inputs):
        shape = np.array(self.shape_of(inputs[0]), np.int64)
        start, end = attrs.get("start", 0), attrs.get("end", None)
        return shape[start:end]

    def op_Reshape(self, bb, node, attrs, inputs):
        from tvm import relax

        x = inputs[0]
        target = self._reshape_target(self.shape_of(x), inputs[1], attrs)
        return bb.emit(relax.op.reshape(x, target))

    def op_Flatten(self, bb, node, attrs, inputs):
        from tvm import relax

        shape = self.shape_of(inputs[0])
        axis = attrs.get("axis", 1)
        axis += len(shape) if axis < 0 else 0  # axis may be the rank itself: (everything, 1)
        return bb.emit(relax.op.reshape(inputs[0], [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]))

    def op_Squeeze(self, bb, node, attrs, inputs):
        from tvm import relax

        axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
        return bb.emit(relax.op.squeeze(inputs[0], [int(a) for a in axes] if axes is not None else None))

    def op_Unsqueeze(self, bb, node, attrs, inputs):
        from tvm import relax

        axes = inputs[1] if len(inputs) > 1 else attrs["axes"]
        return bb.emit(relax.op.expand_dims(inputs[0], [int(a) for a in np.asarray(axes).ravel()]))

    def op_Concat(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.concat([self.expr(v) for v in inputs], axis=attrs["axis"]))

    def op_Transpose(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.permute_dims(inputs[0], attrs.get("perm")))

    def op_Gather(self, bb, node, attrs, inputs):
        from tvm import relax

        data, index = inputs
        axis = attrs.get("axis", 0)
        if isinstance(index, np.ndarray) and index.ndim == 0 and not isinstance(data, np.ndarray):
            # a constant scalar index (q/k/v selection): a slice, no gather
            axis %= len(self.shape_of(data))
            i = int(index) % self.shape_of(data)[axis]
            part = bb.emit(relax.op.strided_slice(data, [axis], [i], [i + 1]))
            return bb.emit(relax.op.squeeze(part, [axis]))
        return bb.emit(relax.op.take(self.expr(data), self.expr(index), axis=axis))

    def op_Identity(self, bb, node, attrs, inputs):
        return inputs[0]

    op_Dropout = op_Identity

    def op_Cast(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.astype(inputs[0], str(_np_dtype(attrs["to"]))))

    def op_Slice(self, bb, node, attrs, inputs):
        from tvm import relax

        starts, ends = (np.asarray(v).ravel().tolist() for v in inputs[1:3])
        axes = np.asarray(inputs[3]).ravel().tolist() if len(inputs) > 3 and inputs[3] is not None \
            else list(range(len(starts)))
        steps = np.asarray(inputs[4]).ravel().tolist() if len(inputs) > 4 and inputs[4] is not None \
            else [1] * len(starts)
        shape = self.shape_of(inputs[0])
        ends = [min(e, shape[a]) if e >= 0 else e for e, a in zip(ends, axes)]
        return bb.emit(relax.op.strided_slice(inputs[0], axes, starts, ends, steps))

    def op_Split(self, bb, node, attrs, inputs):
        from tvm import relax

        axis = attrs.get("axis", 0)
        sizes = np.asarray(inputs[1]).ravel().tolist() if len(inputs) > 1 and inputs[1] is not None \
            else attrs.get("split")
        if sizes is None:
            parts = len(node.output)
            indices = parts
        else:
            indices = np.cumsum(sizes)[:-1].tolist()
        tup = bb.emit(relax.op.split(inputs[0], indices, axis=axis))
        return [bb.emit(relax.TupleGetItem(tup, i)) for i in range(len(node.output))]

    # --- elementwise / normalization -----------------------------------------------------------
    def _binary(self, bb, fn, inputs):
        return bb.emit(fn(self.expr(inputs[0]), self.expr(inputs[1])))

    def op_Add(self, bb, node, attrs, inputs):
        from tvm import relax

        return self._binary(bb, relax.op.add, inputs)

    def op_Sub(self, bb, node, attrs, inputs):
        from tvm import relax

        return self._binary(bb, relax.op.subtract, inputs)

    def op_Mul(self, bb, node, attrs, inputs):
        from tvm import relax

        return self._binary(bb, relax.op.multiply, inputs)

    def op_Div(self, bb, node, attrs, inputs):
        from tvm import relax

        return self._binary(bb, relax.op.divide, inputs)

    def op_Pow(self, bb, node, attrs, inputs):
        from tvm import relax

        return self._binary(bb, relax.op.power, inputs)

    def op_Relu(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.nn.relu(inputs[0]))

    def op_Sigmoid(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.sigmoid(inputs[0]))

    def op_Tanh(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.tanh(inputs[0]))

    def op_Sqrt(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.sqrt(inputs[0]))

    def op_Erf(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.erf(inputs[0]))

    def op_Gelu(self, bb, node, attrs, inputs):
        from tvm import relax

        if attrs.get("approximate", "none") == "tanh":
            return bb.emit(relax.op.nn.gelu_tanh(inputs[0]))
        # x · (½ + ½ erf(x / √2)) with Relax's erf, which the build turns into TVM's vectorizable fast_erf
        # (relax.nn.gelu legalizes to libm's scalar erf)
        x = inputs[0]
        dtype = self.dtype_of(x)
        erf = bb.emit(relax.op.erf(bb.emit(relax.op.multiply(x, relax.const(0.7071067811865476, dtype)))))
        half = relax.const(0.5, dtype)
        return bb.emit(relax.op.multiply(x, bb.emit(relax.op.add(half, bb.emit(relax.op.multiply(erf, half))))))

    def op_Clip(self, bb, node, attrs, inputs):
        from tvm import relax

        lo = float(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("min", -3.4e38)
        hi = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else attrs.get("max", 3.4e38)
        return bb.emit(relax.op.clip(inputs[0], lo, hi))

    def op_Softmax(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.nn.softmax(inputs[0], axis=attrs.get("axis", -1)))

    def op_LayerNormalization(self, bb, node, attrs, inputs):
        from tvm import relax

        x = inputs[0]
        rank = len(self.shape_of(x))
        axis = attrs.get("axis", -1) % rank
        axes = list(range(axis, rank))
        scale = self.expr(inputs[1])
        bias = self.expr(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else \
            self.const(np.zeros(self.shape_of(inputs[1]), np.float32))
        return bb.emit(relax.op.nn.layer_norm(x, scale, bias, axes, epsilon=attrs.get("epsilon", 1e-5)))

    def op_BatchNormalization(self, bb, node, attrs, inputs):
        from tvm import relax

        x, scale, bias, mean, var = inputs[:5]
        k = (scale / np.sqrt(var + attrs.get("epsilon", 1e-5))).astype(np.float32)
        shift = (bias - mean * k).astype(np.float32)
        rank = len(self.shape_of(x))
        bshape = [1, -1] + [1] * (rank - 2)
        y = bb.emit(relax.op.multiply(x, self.const(k.reshape(bshape))))
        return bb.emit(relax.op.add(y, self.const(shift.reshape(bshape))))

    def op_ReduceMean(self, bb, node, attrs, inputs):
        from tvm import relax

        axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
        axes = [int(a) for a in np.asarray(axes).ravel()] if axes is not None else None
        return bb.emit(relax.op.mean(inputs[0], axes, keepdims=bool(attrs.get("keepdims", 1))))

    def _pool_args(self, attrs, rank):
        kernel = attrs["kernel_shape"]
        pads = attrs.get("pads", [0] * (2 * len(kernel)))
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise NotImplementedError("auto_pad SAME is not lowered yet")
        return kernel, attrs.get("strides", [1] * len(kernel)), attrs.get("dilations", [1] * len(kernel)), pads

    def op_MaxPool(self, bb, node, attrs, inputs):
        from tvm import relax

        if isinstance(inputs[0], Blocked):
            pooled = self._max_pool_blocked(bb, node, inputs[0])
            if pooled is not None:
                return pooled
            inputs = [self.fp32(bb, inputs[0]), *inputs[1:]]
        kernel, strides, dilations, pads = self._pool_args(attrs, 4)
        out = bb.emit(relax.op.nn.max_pool2d(inputs[0], kernel, strides, pads, dilations,
                                             ceil_mode=bool(attrs.get("ceil_mode", 0))))
        source = node.input[0]
        if source in self.nonnegative and self._pool_covers(self.shape_of(inputs[0]), self.shape_of(out), kernel,
                                                            strides, dilations, pads):
            # every input pixel is in some window and none is negative: the pooled maximum is the input's
            self._absmax, self._nonnegative = self.absmax[source], True
        return out

    def _max_pool_blocked(self, bb, node, x: Blocked) -> Blocked | None:
        """A max pooling of a blocked activation, blocked (``kernels.max_pool``: vectorized over a pixel's block of
        channels); None where ``_kernel_pool`` says it cannot."""
        pool = self._kernel_pool(node)
        if pool is None:
            return None
        n, c, h, w = x.shape
        block, e = x.block, x.halo
        halo = HALO if self._halo_readers(node.output[0], n) else 0

        def te_pool(data):
            return kernels.max_pool(lambda b, o, y, xx: data[b, o // block, y + e, xx + e, o % block], (n, c, h, w),
                                    pool, block=block, halo=halo)

        out = bb.emit_te(te_pool, x.tensor, primfunc_name_hint="bitpass_max_pool_nchwc")
        return Blocked(out, [n, c, kernels.pool_out_size(h, pool), kernels.pool_out_size(w, pool)], block, halo=halo)

    @staticmethod
    def _pool_covers(in_shape, out_shape, kernel, strides, dilations, pads) -> bool:
        """Whether a pooling's windows together read every input pixel (no stride skips one, the last window
        reaches the last pixel)."""
        for axis, (k, s, d) in enumerate(zip(kernel, strides, dilations)):
            size, windows = in_shape[2 + axis], out_shape[2 + axis]
            if d != 1 or s > k or (windows - 1) * s - pads[axis] + k < size:
                return False
        return True

    def op_AveragePool(self, bb, node, attrs, inputs):
        from tvm import relax

        kernel, strides, dilations, pads = self._pool_args(attrs, 4)
        return bb.emit(relax.op.nn.avg_pool2d(inputs[0], kernel, strides, pads, dilations,
                                              ceil_mode=bool(attrs.get("ceil_mode", 0)),
                                              count_include_pad=bool(attrs.get("count_include_pad", 0))))

    def op_GlobalAveragePool(self, bb, node, attrs, inputs):
        from tvm import relax

        return bb.emit(relax.op.nn.adaptive_avg_pool2d(inputs[0], (1, 1)))

    # --- bitpass kernels ---------------------------------------------------------------------
    def _record(self, node, kind: str, bits: int, nbytes: int, attrs: KernelAttrs) -> None:
        layer = self.plan(node).layer_id or node.name
        epilogue = "+".join(["bias", *(["residual"] if attrs.residual else []),
                             *([attrs.act] if attrs.act != "none" else []), *(["maxpool"] if attrs.pool[0] else []),
                             *(["absmax"] if attrs.amax_out else [])])
        self.report.layers[str(layer)] = {"node": node.name, "lowering": BITPASS_KERNEL, "kernel": kind,
                                          "weight_bits": bits, "weight_bytes": int(nbytes), "epilogue": epilogue}
        if attrs.amax_in:  # its input's scale came with the input: no pass over it
            self.report.layers[str(layer)]["input_absmax"] = "carried"
        self.report.weight_bytes += nbytes
        self.mark(node, BITPASS_KERNEL)

    def _epilogue(self, bb, node, out_shape: list[int], residual: bool) -> tuple[str, Any]:
        """The activation and residual input fused after ``node``'s kernel: a following Relu, or an Add of a
        tensor of the output's shape that is already computed (a skip connection), then maybe a Relu. The
        fused nodes are skipped and their outputs become the kernel's output."""
        out = node.output[0]
        user = self._single_consumer(out)
        added = None
        if residual and user is not None and user.op_type == "Add" and user.domain in ("", "ai.onnx") \
                and len(user.input) == 2 and user.input[0] != user.input[1]:
            other = self.env.get(user.input[1] if user.input[0] == out else user.input[0])
            if isinstance(other, (Codes, ChannelsLast)) and \
                    not (self.plan(node).weight_bits == 8 and self.scheme.int8_codes):
                other = self.fp32(bb, other)
            if isinstance(other, Blocked) and self.plan(node).weight_bits != 32:  # only the fp32 conv reads it
                other = self.fp32(bb, other)
            if other is not None and not isinstance(other, np.ndarray) and self.shape_of(other) == out_shape \
                    and self.dtype_of(other) == "float32":
                added = other
                self.fused.add(id(user))
                self._alias.append(user.output[0])
                out, user = user.output[0], self._single_consumer(user.output[0])
        if user is not None and user.op_type == "Relu" and user.domain in ("", "ai.onnx"):
            self.fused.add(id(user))
            self._alias.append(user.output[0])
            return "relu", added
        return "none", added

    def op_Conv(self, bb, node, attrs, inputs):
        x, w = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        if not isinstance(w, np.ndarray) or len(w.shape) != 4 or \
                (bias is not None and not isinstance(bias, np.ndarray)):
            return self.imported(bb, node, inputs)  # not a layer with constant weights: TVM's conv2d
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return self.imported(bb, node, inputs)
        bits = self.plan(node).weight_bits
        if bits not in (8, 32):
            raise LoweringError(Problem("Conv", node.name, f"{bits}-bit weights have no TVM kernel"))
        oc = w.shape[0]
        ob = kernels.out_block(oc, self.lanes)
        groups = attrs.get("group", 1)
        if groups > 1 and (oc // groups) % ob:
            ob = kernels.out_block(oc // groups, self.lanes)
        pads = attrs.get("pads", [0, 0, 0, 0])
        geometry = {"strides": tuple(attrs.get("strides", [1, 1])), "pads": (pads[0], pads[1], pads[2], pads[3]),
                    "dilations": tuple(attrs.get("dilations", [1, 1])), "groups": groups}
        n, _, h, wd = self.shape_of(x)
        out_shape = [n, oc, kernels.conv_out_size(h, pads[0] + pads[2], w.shape[2], geometry["strides"][0],
                                                  geometry["dilations"][0]),
                     kernels.conv_out_size(wd, pads[1] + pads[3], w.shape[3], geometry["strides"][1],
                                           geometry["dilations"][1])]
        act, residual = self._epilogue(bb, node, out_shape, residual=bits == 32 or self.scheme.int8_residual)
        if bits == 8:
            return self._conv_int8(bb, node, x, w, bias, ob, geometry, act, residual, out_shape)
        return self._conv_fp32(bb, node, x, w, bias, ob, geometry, act, residual, out_shape)

    def _conv_fp32(self, bb, node, x, w: np.ndarray, bias, ob: int, geometry: dict[str, Any], act: str, residual,
                   out_shape: list[int]):
        """``kernels.conv2d``, reading its input and residual as they come (blocked or NCHW) and writing blocked
        where every reader of its (fused) output takes that (``_blocked_readers``)."""
        b = bias.astype(np.float32) if bias is not None else np.zeros(w.shape[0], np.float32)
        n, c, h, wd = self.shape_of(x)
        block_in = x.block if isinstance(x, Blocked) and self._reads_blocked(node) and \
            (not x.halo or max(geometry["pads"]) <= x.halo) else 0
        halo_in = x.halo if block_in else 0
        x = x.tensor if block_in else self.fp32(bb, x)
        block_res = residual.block if isinstance(residual, Blocked) else 0
        halo_res = residual.halo if block_res else 0
        residual = residual.tensor if block_res else residual
        # a batch is pooled a sample per parallel task (``schedules.Conv2d``): only with enough samples to share
        pool = self._fused_pool(self._alias[-1] if self._alias else node.output[0], geometry, 0, ob, residual,
                                fp32=True) if self.shape_of(x)[0] >= kernels.POOL_MIN_TASKS else (0, 0, 0)
        final = self._alias[-1] if self._alias else node.output[0]
        block = self._fp32_block()
        block_out = block if geometry["groups"] == 1 and ob % max(block, 1) == 0 and w.shape[0] % max(block, 1) == 0 \
            and self._blocked_readers(final) else 0
        # only the hand-written kernels write a border: the blocked conv (the schedule swaps it in on the same test,
        # and reads a residual only blocked) and the Winograd conv
        from bitpass.backends.tvm import blocked, winograd

        bordered = self.lanes == blocked.LANES and (residual is None or block_res) and \
            blocked.conv2d_supported(block_in, block_out, ob, geometry["groups"], geometry["pads"], halo_in, pool)
        fast = WINOGRAD and self.fp32_plan and self.lanes == winograd.LANES and (residual is None or block_res) and \
            winograd.supported(block_in, block_out, c, w.shape[0], w.shape[2:], geometry["strides"], geometry["pads"],
                               geometry["dilations"], geometry["groups"], pool, tuple(out_shape[2:]))
        halo_out = HALO if (bordered or fast) and self._halo_readers(final, n) else 0
        if fast:
            return self._conv_winograd(bb, node, x, w, b, (n, c, h, wd), act, residual, block_in, halo_in, halo_res,
                                       halo_out)
        wp = self.shared(("conv", node.name, ob, block_in),
                         lambda: self.const(kernels.pack_conv(w.astype(np.float32), ob, block_in)))
        tags = KernelAttrs("conv2d", ob, act=act, residual=residual is not None, pool=pool, block_in=block_in,
                           block_out=block_out, halo_in=halo_in, halo_out=halo_out, halo_res=halo_res, **geometry)
        self._record(node, "conv2d", 32, w.size * 4, tags)
        if block_in or block_out:
            entry = self.report.layers[str(self.plan(node).layer_id or node.name)]
            entry["activations"] = {"in": _layout(block_in, halo_in), "out": _layout(block_out, halo_out)}

        def te_conv(data, weight, bias_, *rest):
            return kernels.conv2d(data, weight, bias_, rest[0] if rest else None, **geometry, act=act, pool=pool,
                                  block_in=block_in, block_out=block_out, block_res=block_res, halo_in=halo_in,
                                  halo_out=halo_out, halo_res=halo_res)

        extra = [residual] if residual is not None else []
        out = bb.emit_te(te_conv, x, wp, self.expr(b), *extra, primfunc_name_hint="bitpass_conv2d",
                         primfunc_attrs=tags.to_func_attrs())
        if not block_out:
            return out
        dims = [int(d) for d in out.ty.shape]  # [N, OC/block, H + 2·halo, W + 2·halo, block]
        return Blocked(out, [dims[0], int(w.shape[0]), dims[2] - 2 * halo_out, dims[3] - 2 * halo_out], block_out,
                       halo=halo_out)

    def _conv_winograd(self, bb, node, x, w: np.ndarray, b: np.ndarray, shape: tuple[int, int, int, int], act: str,
                       residual, block_in: int, halo_in: int, halo_res: int, halo_out: int) -> Blocked:
        """A 3×3 stride-1 fp32 conv between blocked activations by Winograd's F(m×m, 3×3) (``winograd.conv2d``): the
        weights stored transformed, (m+2)²/9 × their bytes, for a quarter to a half of the multiplies."""
        from tvm import relax

        from bitpass.backends.tvm import winograd

        n, c, h, wd = shape  # the input's, and (3×3, stride 1, padding 1) the output's
        oc = int(w.shape[0])
        m = winograd.tile_size(h, wd)
        u = self.shared(("winograd", node.name, m), lambda: self.const(winograd.pack_weights(w, m)))
        tags = KernelAttrs("conv2d_winograd", winograd.CHANNELS, act=act, residual=residual is not None,
                           pads=(1, 1, 1, 1), block_in=block_in, block_out=winograd.LANES, halo_in=halo_in,
                           halo_out=halo_out, halo_res=halo_res)
        self._record(node, "conv2d_winograd", 32, winograd.weight_bytes(oc, c, m), tags)
        entry = self.report.layers[str(self.plan(node).layer_id or node.name)]
        entry["algorithm"] = f"Winograd F({m}x{m}, 3x3)"
        entry["activations"] = {"in": _layout(block_in, halo_in), "out": _layout(winograd.LANES, halo_out)}
        kernel = winograd.conv2d((n, c, h, wd), oc, act, True, residual is not None, halo_in, halo_out, halo_res)
        gv = bb.add_func(tags.tag(kernel), "bitpass_conv2d_winograd")
        args = [x, u, self.expr(b), *([residual] if residual is not None else [])]
        out_shape = [n, oc // winograd.LANES, h + 2 * halo_out, wd + 2 * halo_out, winograd.LANES]
        out = bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))
        return Blocked(out, [n, oc, h, wd], winograd.LANES, halo=halo_out)

    def _fp32_block(self) -> int:
        """Channels per block of the fp32 convs' blocked activations (0: NCHW)."""
        return self.scheme.fp32_block if FP32_BLOCKED else 0

    def _reads_blocked(self, node: onnx.NodeProto) -> bool:
        """Whether the Conv ``node`` is an fp32 conv with constant weights that reads a blocked input: groups = 1
        and its input channels whole blocks."""
        block = self._fp32_block()
        w = self._plain_conv_weight(node) if block else None
        return w is not None and self.plan(node).weight_bits == 32 and int(w.shape[1]) % block == 0

    def _plain_conv_weight(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The 4-D weight of a Conv ``node`` that bitpass's conv kernels take (constant weight and bias, one group,
        explicit padding), else None: what the blocked fp32 and the VNNI int8 rules both start from."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            return None
        attrs = _attrs(node)
        w = self._weight_of(node)
        bias = self.env.get(node.input[2], self.inits.get(node.input[2])) if len(node.input) > 2 and node.input[2] \
            else np.zeros(0)
        plain = w is not None and w.ndim == 4 and isinstance(bias, np.ndarray) and attrs.get("group", 1) == 1 and \
            attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        return w if plain else None

    @staticmethod
    def _kernel_pool(node: onnx.NodeProto) -> tuple[int, int, int] | None:
        """(kernel, stride, pad) of a max pooling ``kernels.max_pool`` computes (reading and writing blocked
        activations, or in a conv's epilogue: ``_fused_pool``): square, symmetric, undilated, no ceil mode, no Indices
        output, windows that each hold an image pixel; None for any other node."""
        if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1:
            return None
        attrs = _attrs(node)
        kernel = list(attrs.get("kernel_shape", []))
        strides = list(attrs.get("strides", [1] * len(kernel)))
        pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
        if len(kernel) != 2 or len(set(kernel)) != 1 or len(set(strides)) != 1 or len(set(pads)) != 1 or \
                any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("ceil_mode", 0) or \
                attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        pool = (int(kernel[0]), int(strides[0]), int(pads[0]))
        return pool if kernels.pool_fusable(pool) else None

    def _blocked_readers(self, value: str, through_pool: bool = True) -> bool:
        """Whether every reader of ``value`` takes it blocked: an fp32 conv's data input (``_reads_blocked``), a max
        pooling whose readers do (``_kernel_pool``), or a residual Add that an fp32 conv not lowered yet will fuse
        (its other input's writer, read by nothing else). Then the conv writing ``value`` writes it blocked."""
        if not self._fp32_block() or value in self.graph_outputs or not self.consumers.get(value):
            return False
        for user in self.consumers[value]:
            if user.op_type == "Conv" and user.input[0] == value and value not in user.input[1:] and \
                    self._reads_blocked(user):
                continue
            if through_pool and user.input[0] == value and self._kernel_pool(user) is not None and \
                    self._blocked_readers(user.output[0], False):
                continue
            if user.op_type == "Add" and user.domain in ("", "ai.onnx") and len(user.input) == 2 and \
                    user.input[0] != user.input[1]:
                other = user.input[1] if user.input[0] == value else user.input[0]
                writer = self.producer.get(other)
                if other not in self.env and writer is not None and writer.op_type == "Conv" and \
                        self.plan(writer).weight_bits == 32 and self._single_consumer(other) is user:
                    continue
            return False
        return True

    def _halo_readers(self, value: str, batch: int) -> bool:
        """Whether the blocked ``value`` carries a border of ``HALO`` pixels of zeros (``Blocked.halo``): every reader
        takes it blocked (``_blocked_readers``) and every conv reading it as its input pads it by at most that much,
        so reads it in place; max poolings and residual Adds read it at an offset. Only below the batch from which
        the TE conv pads each sample under its own parallel iteration, in cache, with no barrier
        (``schedules.PER_SAMPLE_MIN_BATCH``): there the border measured no gain (1.000×, 0.956×, 1.016× on ResNet-18
        at batch 32)."""
        from bitpass.backends.tvm.schedules import PER_SAMPLE_MIN_BATCH

        if not FP32_HALO or batch >= PER_SAMPLE_MIN_BATCH or not self._blocked_readers(value):
            return False
        for user in self.consumers[value]:
            if user.op_type == "Conv" and user.input[0] == value and max(_attrs(user).get("pads", [0])) > HALO:
                return False
        return True

    def _int8_conv_reads(self, value: str, through_pool: bool = True) -> bool:
        """Whether an int8 conv reads ``value`` (directly, or through a max pooling that passes its absmax on)."""
        for user in self.consumers.get(value, []):
            if user.op_type == "Conv" and user.input[0] == value and self.plan(user).weight_bits == 8:
                return True
            if through_pool and user.op_type == "MaxPool" and self._int8_conv_reads(user.output[0], False):
                return True
        return False

    def _conv_int8(self, bb, node, x, w: np.ndarray, bias, ob: int, geometry: dict[str, Any], act: str, residual,
                   out_shape: list[int]):
        """int8 weights (per output channel) × int8 activations quantized per sample: ``kernels.conv2d_int8``,
        replaced by a target's micro-kernel where it has one (the geometry travels as function attributes).
        Where the scheme carries the absmax, the conv reads its input's from the int8 conv that wrote it and
        writes its own output's when an int8 conv reads that (its micro-kernel takes it in the epilogue)."""
        from tvm import relax

        levels = self.scheme.int8_levels
        taps = kernels.conv_int8_taps(w.shape[1], w.shape[3], geometry["dilations"][1])
        carry = self.scheme.int8_amax_carry
        vnni = self._vnni_int8_conv(node)
        if isinstance(x, (ChannelsLast, Blocked)) or isinstance(x, Codes) and not self._reads_codes_in_place(node):
            x = self.fp32(bb, x)
        if isinstance(residual, (Codes, ChannelsLast)) and not vnni:
            residual = self.fp32(bb, residual)
        amax_in = self.absmax.get(node.input[0]) if carry and not isinstance(x, Codes) else None
        pool = self._fused_pool(self._alias[-1] if self._alias else node.output[0], geometry, taps, ob, residual)
        final = self._alias[-1] if self._alias else node.output[0]
        out_scale = self._code_scale(final, act) if vnni and len(out_shape) == 4 else None
        nhwc_out = vnni and out_scale is None and not pool[0] and len(out_shape) == 4 and \
            self._residual_of_code_writer(final)
        lo, hi = self.ranges.get(final, (0.0, 0.0))
        nhwc_scale = max(abs(lo), abs(hi)) / 127.0 if nhwc_out and max(abs(lo), abs(hi)) > 0 else None
        amax_out = carry and geometry["groups"] == 1 and not taps and ob % self.lanes == 0 and \
            self._int8_conv_reads(final) and len(out_shape) == 4 and out_scale is None and not nhwc_out

        def make8():
            codes, scale = kernels.quantize_conv_int8(w.astype(np.float32), ob, taps, levels)
            return self.const(codes), self.const(scale), codes.nbytes + scale.nbytes

        codes, scale, nbytes = self.shared(("conv8", node.name, ob, levels), make8)
        b = bias.astype(np.float32) if bias is not None else np.zeros(w.shape[0], np.float32)
        tags = KernelAttrs("conv2d_int8", ob, act=act, residual=residual is not None, taps=taps, levels=levels,
                           amax_in=amax_in is not None, amax_out=amax_out, pool=pool, **geometry)
        self._record(node, "conv2d_int8", 8, nbytes, tags)
        if isinstance(x, Codes) or isinstance(residual, (Codes, ChannelsLast)) or out_scale is not None or nhwc_out:
            entry = self.report.layers[str(self.plan(node).layer_id or node.name)]
            entry["activations"] = {"in": "uint8" if isinstance(x, Codes) else "float32",
                                    "out": "uint8" if out_scale is not None else
                                    ("int8" if nhwc_scale else "float32") + " channels-last" if nhwc_out
                                    else "float32"}
            return self._conv_int8_codes(bb, x, codes, scale, self.expr(b), residual, amax_in, tags, out_shape,
                                         out_scale, nhwc_out, nhwc_scale)
        has_residual = residual is not None

        def te_conv8(data, cc, ss, bb_, *rest):
            return kernels.conv2d_int8(data, cc, ss, bb_, rest[0] if has_residual else None,
                                       rest[-1] if amax_in is not None else None, **geometry, act=act, taps=taps,
                                       levels=levels, emit_amax=amax_out, pool=pool)

        extra = [v for v in (residual, amax_in) if v is not None]
        result = bb.emit_te(te_conv8, x, codes, scale, self.expr(b), *extra, primfunc_name_hint="bitpass_conv2d_int8",
                            primfunc_attrs=tags.to_func_attrs())
        if not amax_out:
            return result
        self._absmax = bb.emit(relax.TupleGetItem(result, 1))
        self._nonnegative = act == "relu"
        return bb.emit(relax.TupleGetItem(result, 0))

    def _weight_of(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The constant weight of the Conv ``node`` (an initializer, or folded from constants already lowered)."""
        if len(node.input) < 2:
            return None
        w = self.env.get(node.input[1], self.inits.get(node.input[1]))
        return w if isinstance(w, np.ndarray) else None

    def _vnni_int8_conv(self, node: onnx.NodeProto) -> bool:
        """Whether ``node`` is an int8 conv the scheme's VNNI micro-kernel runs taking codes and channels-last
        tensors (``_conv_int8_codes``): the one rule for the conv itself, for a conv reading codes in place and for
        the int8 conv fusing a residual Add whose other input is written as codes or channels-last. Every
        decision about codes asks it, so a writer never writes codes a reader then decodes."""
        if not self.scheme.int8_codes or node.op_type != "Conv" or self.plan(node).weight_bits != 8:
            return False
        w = self._plain_conv_weight(node)
        return w is not None and \
            not kernels.conv_int8_taps(int(w.shape[1]), int(w.shape[3]), _attrs(node).get("dilations", [1, 1])[1]) \
            and kernels.out_block(int(w.shape[0]), self.lanes) % self.lanes == 0

    def _reads_codes_in_place(self, node: onnx.NodeProto) -> bool:
        """Whether the conv ``node`` can read its input as codes: a VNNI int8 conv (``_vnni_int8_conv``) whose
        input channels fill whole words and whose padding is symmetric within the codes' border
        (``avx512.u8_readable``)."""
        from bitpass.backends.tvm import avx512

        if not self._vnni_int8_conv(node):
            return False
        pads = tuple(_attrs(node).get("pads", [0, 0, 0, 0]))
        w = self._weight_of(node)
        return w is not None and len(pads) == 4 and avx512.u8_readable(int(w.shape[1]), pads)

    def _residual_add_of_code_writer(self, value: str, user: onnx.NodeProto) -> bool:
        """Whether ``user``, a reader of ``value``, is an Add that the VNNI int8 conv writing its other input (not
        lowered yet, read by nothing else) will fuse as its epilogue's residual input, so ``value`` may reach it
        as codes or channels-last (``_epilogue``). The one rule ``_code_scale`` and ``_residual_of_code_writer``
        share."""
        if user.op_type != "Add" or user.domain not in ("", "ai.onnx") or len(user.input) != 2 or \
                user.input[0] == user.input[1] or value not in user.input:
            return False
        other = user.input[1] if user.input[0] == value else user.input[0]
        writer = self.producer.get(other)
        return other not in self.env and writer is not None and self._single_consumer(other) is user and \
            self._vnni_int8_conv(writer)

    def _code_scale(self, value: str, act: str) -> float | None:
        """The scale at which an int8 conv writes ``value`` (its fused output) as codes: where the value has a
        calibrated range, is a ReLU's (zero point 0) and every reader takes codes: an int8 conv's data input read
        in place, or the residual input of an int8 conv's epilogue (``_residual_add_of_code_writer``). None: the
        conv writes fp32."""
        lo_hi = self.ranges.get(value)
        if act != "relu" or lo_hi is None or not lo_hi[1] > 0 or value in self.graph_outputs or \
                not self.consumers.get(value):
            return None
        for user in self.consumers[value]:
            if user.op_type == "Conv" and user.input[0] == value and value not in user.input[1:] and \
                    self._reads_codes_in_place(user):
                continue
            if self._residual_add_of_code_writer(value, user):
                continue
            return None
        return float(lo_hi[1]) / 255.0

    def _residual_of_code_writer(self, value: str) -> bool:
        """Whether ``value`` (a conv's output) is read only by an Add that an int8 conv not lowered yet will fuse
        as its residual input while writing codes (``_code_scale``): then it is written channels-last."""
        user = self._single_consumer(value)
        if user is None or not self._residual_add_of_code_writer(value, user):
            return False
        after = self._single_consumer(user.output[0])
        relu = after is not None and after.op_type == "Relu" and after.domain in ("", "ai.onnx")
        return self._code_scale(after.output[0] if relu else user.output[0], "relu" if relu else "none") is not None

    def _conv_int8_codes(self, bb, x, codes, scale, bias, residual, amax_in, tags: KernelAttrs, out_shape: list[int],
                         out_scale: float | None, nhwc_out: bool = False, nhwc_scale: float | None = None):
        """The VNNI micro-kernel called directly (no TE definition takes codes): reading ``x`` as codes or fp32,
        ``residual`` as codes, channels-last or fp32, writing codes of ``out_scale`` (a ``Codes`` value),
        channels-last (signed codes of ``nhwc_scale``, or fp32) or fp32."""
        from tvm import relax

        from bitpass.backends.tvm import avx512, schedules

        n, c, h, wd = self.shape_of(x)
        codes_shape = self.shape_of(codes)
        pk, ps, pp = tags.pool
        conv_shape = list(out_shape)
        if pk:  # the kernel writes the pooled tensor
            out_shape = [*out_shape[:2], *((size + 2 * pp - pk) // ps + 1 for size in out_shape[2:])]
        work = conv_shape[0] * conv_shape[1] * conv_shape[2] * conv_shape[3] * c * codes_shape[2] * codes_shape[3]
        slots = self.shape_of(amax_in)[1] if amax_in is not None else 0
        kernel = avx512.conv2d_int8(
            (n, c, h, wd), out_shape[1], tags.nb, (codes_shape[2], codes_shape[3]), tags.strides, tags.pads,
            tags.dilations, tags.act, parallel=work >= schedules.PARALLEL_MIN_WORK, residual=residual is not None,
            amax_in=slots, pool=tags.pool, u8_in=x.scale if isinstance(x, Codes) else 0.0,
            u8_out=out_scale or 0.0, u8_res=residual.scale if isinstance(residual, Codes) else 0.0,
            nhwc_out=nhwc_scale or nhwc_out,
            nhwc_res=(residual.scale or True) if isinstance(residual, ChannelsLast) else False)
        gv = bb.add_func(tags.tag(kernel), "bitpass_conv2d_int8_codes")
        stored = {Codes: lambda v: v.words, ChannelsLast: lambda v: v.tensor}
        args = [stored.get(type(x), lambda v: v)(x), codes, scale, bias,
                *([stored.get(type(residual), lambda v: v)(residual)] if residual is not None else []),
                *([amax_in] if amax_in is not None else [])]
        if nhwc_out:
            nhwc = [out_shape[0], out_shape[2], out_shape[3], out_shape[1]]
            tensor = bb.emit(relax.call_tir(gv, args, relax.TensorType(nhwc, "int8" if nhwc_scale else "float32")))
            return ChannelsLast(tensor, list(out_shape), nhwc_scale)
        if out_scale is None:
            return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))
        words = bb.emit(relax.call_tir(gv, args, relax.TensorType(avx512.u8_shape(out_shape), "uint8")))
        return Codes(words, list(out_shape), out_scale)

    def _fused_pool(self, value: str, geometry: dict[str, Any], taps: int, ob: int, residual,
                    fp32: bool = False) -> tuple[int, int, int]:
        """(kernel, stride, pad) of the max pooling that alone reads ``value``, the output of a conv, computed in
        the conv's epilogue (the conv's full output, 102 MB for ResNet's stem at batch 32, then never reaches
        memory): fp32 convs' TE schedule, int8 convs where the scheme's micro-kernel does it. The pooling node is
        skipped and its output is the conv's. (0, 0, 0) when there is none, or it cannot be fused (non-square,
        dilated, ceil mode, Indices output)."""
        none = (0, 0, 0)
        user = self._single_consumer(value)
        if not (fp32 or self.scheme.int8_pool) or user is None or residual is not None or taps or \
                geometry["groups"] != 1 or ob % self.lanes:
            return none
        pool = self._kernel_pool(user)
        if pool is None:
            return none
        self.fused.add(id(user))
        self._alias.append(user.output[0])
        return pool

    def op_Gemm(self, bb, node, attrs, inputs):
        a, w = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        if not isinstance(w, np.ndarray) or attrs.get("transA", 0) or \
                (bias is not None and not isinstance(bias, np.ndarray)):
            return self.imported(bb, node, inputs)  # not a layer with a constant weight: TVM's matmul
        w_kn = w.T if attrs.get("transB", 0) else w
        w_kn = w_kn * attrs.get("alpha", 1.0)
        if bias is not None:
            bias = np.broadcast_to(bias * attrs.get("beta", 1.0), (w_kn.shape[1],))
        return self._dense(bb, node, a, w_kn.astype(np.float32), bias)

    def op_MatMul(self, bb, node, attrs, inputs):
        from tvm import relax

        a, w = inputs
        if isinstance(w, np.ndarray) and w.ndim == 2 and not isinstance(a, np.ndarray):
            shape = self.shape_of(a)
            flat = bb.emit(relax.op.reshape(a, [int(np.prod(shape[:-1])), shape[-1]])) if len(shape) != 2 else a
            out = self._dense(bb, node, flat, w.astype(np.float32), None)
            if len(shape) != 2:
                out = bb.emit(relax.op.reshape(out, [*shape[:-1], w.shape[1]]))
            return out
        return bb.emit(relax.op.matmul(self.expr(a), self.expr(w)))

    def _dense(self, bb, node, x, w_kn: np.ndarray, bias):
        """fp32 and int8 dense with N not a multiple of the vector width (a 1000-class head) get zero weight
        columns up to one, and their output is sliced back: whole-register tiles, and on VNNI the micro-kernel
        (11x faster than the TE schedule's 8-wide tiles for 32 × 512 → 1000 here)."""
        from tvm import relax

        n = w_kn.shape[1]
        pad = (-n) % self.lanes if kernels.out_block(n, self.lanes) < self.lanes else 0
        if pad == 0 or self.plan(node).weight_bits not in (8, 32):
            return self._dense_tiles(bb, node, x, w_kn, bias)
        wide = np.pad(w_kn, ((0, 0), (0, pad)))
        b = np.pad(np.broadcast_to(bias, (n,)) if bias is not None else np.zeros(n, np.float32), (0, pad))
        out = self._dense_tiles(bb, node, x, wide, b)
        return bb.emit(relax.op.strided_slice(out, [1], [0], [n]))

    def _dense_tiles(self, bb, node, x, w_kn: np.ndarray, bias):
        from tvm import relax

        k, n = w_kn.shape
        nb = kernels.out_block(n, self.lanes)
        bits = self.plan(node).weight_bits
        if bits not in (4, 8, 32):
            raise LoweringError(Problem(node.op_type, node.name, f"{bits}-bit weights have no TVM kernel"))
        act, _ = self._epilogue(bb, node, [], residual=False)
        b = np.ascontiguousarray(bias, np.float32) if bias is not None else np.zeros(n, np.float32)
        if bits == 32:
            wp = self.shared(("dense", node.name), lambda: self.const(kernels.pack_dense(w_kn, nb)))
            tags = KernelAttrs("dense", nb, act=act)
            self._record(node, "dense", 32, w_kn.size * 4, tags)

            def te_dense(xx, ww, bb_):
                return kernels.dense(xx, ww, bb_, act=act)

            return bb.emit_te(te_dense, x, wp, self.expr(b), primfunc_name_hint="bitpass_dense",
                              primfunc_attrs=tags.to_func_attrs())
        if bits == 8:
            levels = self.scheme.int8_levels

            def make8():
                codes, scale = kernels.quantize_int8(w_kn, nb, levels)
                return self.const(codes), self.const(scale), codes.nbytes + scale.nbytes

            codes, scale, nbytes = self.shared(("dense8", node.name, levels), make8)
            tags = KernelAttrs("dense_int8", nb, act=act, levels=levels)
            self._record(node, "dense_int8", 8, nbytes, tags)

            def te_dense8(xx, cc, ss, bb_):
                return kernels.dense_int8(xx, cc, ss, bb_, act=act, levels=levels)

            return bb.emit_te(te_dense8, x, codes, scale, self.expr(b), primfunc_name_hint="bitpass_dense_int8",
                              primfunc_attrs=tags.to_func_attrs())
        nb = kernels.int4_out_block(n, self.lanes)
        if k % INT4_BLOCK:  # the kernel reduces whole blocks: zero weights × zero inputs add nothing
            kp = -(-k // INT4_BLOCK) * INT4_BLOCK
            w_kn = np.concatenate([w_kn, np.zeros((kp - k, n), w_kn.dtype)])
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, kp - k]))

        def make4():
            q = kernels.quantize_int4(w_kn, nb, INT4_BLOCK)
            return self.const(q.codes), self.const(q.scales), q.nbytes

        codes, scales, nbytes = self.shared(("dense4", node.name), make4)
        tags = KernelAttrs("dense_int4", nb, act=act)
        self._record(node, "dense_int4", 4, nbytes, tags)

        def te_dense4(xx, cc, ss, bb_):
            return kernels.dense_int4(xx, cc, ss, bb_, block_size=INT4_BLOCK, act=act)

        return bb.emit_te(te_dense4, x, codes, scales, self.expr(b), primfunc_name_hint="bitpass_dense_int4",
                          primfunc_attrs=tags.to_func_attrs())


@functools.cache
def importer_ops() -> frozenset[str]:
    """ONNX op types (default domain) TVM's Relax ONNX importer converts, asked of the importer itself: it is
    given one node of every op type ONNX defines and names those it has no converter for (empty when its
    answer cannot be read; ``check`` still asks per node)."""
    from tvm.relax.frontend.onnx import from_onnx

    names = sorted({s.name for s in onnx.defs.get_all_schemas() if s.domain in ("", "ai.onnx")})
    nodes = [onnx.helper.make_node(name, [], [f"probe_{i}"]) for i, name in enumerate(names)]
    probe = onnx.helper.make_model(onnx.helper.make_graph(nodes, "probe", [], []),
                                   opset_imports=[onnx.helper.make_opsetid("", onnx.defs.onnx_opset_version())])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from_onnx(probe)
        except Exception as err:  # noqa: BLE001 - the answer comes as an OpNotImplemented error
            text = str(err)
            marker = "not supported for frontend ONNX:"
            if marker not in text:
                return frozenset()
            refused = {n.strip() for n in text.split(marker, 1)[1].splitlines()[0].split(",")}
            return frozenset(names) - refused
    return frozenset(names)


def rule_ops() -> frozenset[str]:
    """ONNX op types (default domain) this module lowers itself: bitpass's kernels and ``op_*`` rules."""
    return frozenset(name[3:] for name in dir(_Lowering) if name.startswith("op_"))


def lower(model: Model, batches: Sequence[int], scheme: kernels.Scheme,
          ranges: Mapping[str, tuple[float, float]] | None = None) -> tuple[Any, LoweringReport, list[str]]:
    """A Relax IRModule with one function per batch size (``main`` for the first, ``main_b{n}`` for the
    others), the lowering report of the first, and the function names in ``batches`` order. Nodes TVM's
    importer converted are inlined; raises ``LoweringError`` naming the first node that cannot be lowered.
    ``ranges``: calibrated activation ranges by tensor name (``Codes``: where the scheme has them, int8 convs
    pass each other uint8 codes of these scales)."""
    from tvm import relax

    report = LoweringReport()
    lowering = _Lowering(model.to_proto(), plans_of(model), scheme, report, ranges)
    bb = relax.BlockBuilder()
    names = []
    for index, batch in enumerate(batches):
        name = "main" if index == 0 else f"main_b{batch}"
        lowering.report = report if index == 0 else LoweringReport()
        lowering.function(bb, batch, name)
        names.append(name)
    mod = relax.transform.InlinePrivateFunctions()(bb.get())
    return relax.transform.DeadCodeElimination()(mod), report, names


#: Relax operators that stay after ``LegalizeOps`` and are still run by the VM (builtins, packed calls)
_VM_LEVEL = ("relax.call_tir", "relax.call_tir_inplace", "relax.call_dps_packed", "relax.call_packed",
             "relax.call_pure_packed", "relax.call_builtin_with_ctx", "relax.shape_of", "relax.null_value",
             "relax.tensor_to_shape", "relax.shape_to_tensor", "relax.print", "relax.assert_op")


def check(model: Model, scheme: kernels.Scheme, batch: int = 1) -> list[Problem]:
    """Every node of ``model`` that cannot run on TVM, asked of TVM: the lowering runs for one batch size
    (each node through bitpass's kernels and rules or TVM's importer), going on past failures, then TVM's
    operator legalization, whose leftovers (operators with no TIR implementation) are reported by node."""
    from tvm import relax

    proto = model.to_proto()
    lowering = _Lowering(proto, plans_of(model), scheme, LoweringReport())
    lowering.collect = []
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        lowering.value_info = {v.name: v for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - no placeholders: a failure stops the check at that node
        lowering.value_info = {}
    bb = relax.BlockBuilder()
    try:
        lowering.function(bb, batch, "main")
    except LoweringError as err:  # the inputs themselves, or a node fed by one that failed (reported first)
        return [*lowering.collect, err.problem]
    except Exception as err:  # noqa: BLE001 - the function could not be closed (placeholders left in it)
        if not lowering.collect:
            return [Problem("graph", model.provenance.name, first_line(err))]
    if lowering.collect:
        return list(lowering.collect)
    mod = relax.transform.InlinePrivateFunctions()(bb.get())
    try:
        legal = relax.transform.LegalizeOps()(mod)
    except Exception as err:  # noqa: BLE001
        return [Problem("graph", model.provenance.name, f"TVM's operator legalization: {first_line(err)}")]
    del legal
    return []


def unimplemented_ops(func) -> list[str]:
    """Relax operators called in ``func`` that TVM can neither legalize to TIR nor run in the VM (after
    bitpass's own legalizations of operators this TVM lacks, ``legalize.register_missing``)."""
    import tvm
    from tvm import relax

    register_missing()

    missing: list[str] = []
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
                continue
            name = str(value.op.name)
            if name in _VM_LEVEL or name.startswith(("relax.builtin.", "relax.vm.", "relax.memory.")) \
                    or value.op.get_attr("FCallPacked") is not None or value.op.get_attr("FLegalize") is not None:
                continue
            if name not in missing:
                missing.append(name)
    return missing
