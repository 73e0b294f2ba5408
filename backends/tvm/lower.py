"""Lower bitpass's annotated IR (ONNX) to a Relax module, one function per batch size.

Not TVM's ONNX importer: that path cannot take the dynamic-batch flatten torch exports
(Shape → Squeeze → Concat → Reshape), and it would hide the per-layer annotations. Here every
node is visited in order; values are either numpy constants (initializers and everything computed
from them alone, shapes included: the batch is fixed per function, so shape arithmetic folds) or
Relax expressions. Conv, Gemm and MatMul with a constant weight become bitpass's own kernels
(``kernels.py``) at the precision their annotations ask for; other operators become Relax ops,
legalized by TVM and scheduled by ``schedules.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bitpass.backends.tvm import kernels

#: ONNX ops the lowering handles (default domain)
SUPPORTED_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
    "Shape", "Squeeze", "Unsqueeze", "Concat", "Gather", "Transpose", "Add", "Sub", "Mul", "Div", "Softmax",
    "LayerNormalization", "Gelu", "Erf", "Sigmoid", "Tanh", "Sqrt", "Pow", "ReduceMean", "Constant",
    "Identity", "Cast", "Slice", "Split", "Clip", "BatchNormalization", "Dropout",
})

#: weight widths per quantizable op the kernels implement (32 = fp32)
WEIGHT_BITS = {"Conv": (8, 32), "Gemm": (4, 8, 32), "MatMul": (4, 8, 32)}

INT4_BLOCK = 32


@dataclass
class LoweringReport:
    """What each layer became (kernel and width), for the manifest."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    weight_bytes: int = 0


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _meta(node: onnx.NodeProto, key: str) -> Any:
    for p in node.metadata_props:
        if p.key == "bitpass." + key:
            return json.loads(p.value)
    return None


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


class _Lowering:
    def __init__(self, proto: onnx.ModelProto, lanes: int, report: LoweringReport) -> None:
        from tvm import relax

        self.relax = relax
        self.proto = proto
        self.lanes = lanes
        self.report = report
        self.inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in proto.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self._weights: dict[tuple, Any] = {}  # packed weight constants shared between functions
        self.fused: set[str] = set()
        self._relu_alias: tuple[str, str] | None = None
        self._pending_alias: str | None = None

    # --- helpers -------------------------------------------------------------------------
    def const(self, array: np.ndarray):
        from tvm import relax

        array = np.asarray(array)
        return relax.const(array if array.flags.c_contiguous else array.copy())  # keeps 0-d arrays 0-d

    def shared(self, key: tuple, make):
        if key not in self._weights:
            self._weights[key] = make()
        return self._weights[key]

    def expr(self, value):
        if isinstance(value, np.ndarray):
            return self.const(value)
        return value

    def shape_of(self, value) -> list[int]:
        if isinstance(value, np.ndarray):
            return list(value.shape)
        return [int(d) for d in value.ty.shape]

    # --- the function ----------------------------------------------------------------------
    def function(self, bb, batch: int, name: str) -> None:
        """Emit one Relax function for inputs whose symbolic (batch) dimensions are ``batch``."""
        from tvm import relax

        graph = self.proto.graph
        params = []
        env: dict[str, Any] = dict(self.inits)
        for inp in graph.input:
            if inp.name in self.inits:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
            var = relax.Var(inp.name, relax.TensorType(dims, str(_np_dtype(inp.type.tensor_type.elem_type))))
            params.append(var)
            env[inp.name] = var
        self.fused = set()
        with bb.function(name, params):
            with bb.dataflow():
                for node in graph.node:
                    if node.name and node.name in self.fused:
                        continue
                    self._pending_alias = None
                    outs = self.node(bb, node, [env[i] if i else None for i in node.input])
                    for out_name, value in zip(node.output, outs):
                        env[out_name] = value
                    if self._pending_alias is not None:  # a Relu fused into the kernel: same value
                        env[self._pending_alias] = outs[0]
                results = [self.expr(env[o.name]) for o in graph.output]
                out = bb.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
            bb.emit_func_output(out)

    def _fusable_relu(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        users = self.consumers.get(node.output[0], [])
        graph_outputs = {o.name for o in self.proto.graph.output}
        if len(users) == 1 and users[0].op_type == "Relu" and node.output[0] not in graph_outputs and users[0].name:
            return users[0]
        return None

    def node(self, bb, node: onnx.NodeProto, inputs: list[Any]) -> list[Any]:
        op = node.op_type
        attrs = _attrs(node)
        if all(isinstance(v, np.ndarray) or v is None for v in inputs) and op not in ("Conv", "Gemm", "MatMul"):
            folded = self.fold(node, attrs, inputs)
            if folded is not None:
                return folded
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise NotImplementedError(f"the TVM lowering has no rule for {op} (node {node.name!r})")
        result = method(bb, node, attrs, inputs)
        return result if isinstance(result, list) else [result]

    # --- constant folding (numpy) --------------------------------------------------------
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
            return [np.array(x.shape, np.int64)]
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
        axis = attrs.get("axis", 1) % max(len(shape), 1)
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
        return bb.emit(relax.op.nn.gelu(inputs[0]))

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

        kernel, strides, dilations, pads = self._pool_args(attrs, 4)
        return bb.emit(relax.op.nn.max_pool2d(inputs[0], kernel, strides, pads, dilations,
                                              ceil_mode=bool(attrs.get("ceil_mode", 0))))

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
    def _record(self, node, kind: str, bits: int, nbytes: int) -> None:
        layer = _meta(node, "layer_id") or node.name
        self.report.layers[str(layer)] = {"node": node.name, "kernel": kind, "weight_bits": bits,
                                          "weight_bytes": int(nbytes)}
        self.report.weight_bytes += nbytes

    def _epilogue(self, node) -> str:
        relu = self._fusable_relu(node)
        if relu is not None:
            self.fused.add(relu.name)
            self._relu_alias = (relu.output[0], node.output[0])
            return "relu"
        return "none"

    def op_Conv(self, bb, node, attrs, inputs):
        from tvm import relax

        x, w = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        if not isinstance(w, np.ndarray) or len(w.shape) != 4:
            raise NotImplementedError(f"Conv {node.name!r}: only 2-D convolutions with constant weights are lowered")
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise NotImplementedError(f"Conv {node.name!r}: auto_pad is not lowered yet")
        bits = _meta(node, "bits.weight") or 32
        if bits not in (8, 32):
            raise NotImplementedError(f"Conv {node.name!r}: {bits}-bit weights have no TVM kernel")
        oc = w.shape[0]
        ob = kernels.out_block(oc, self.lanes)
        groups = attrs.get("group", 1)
        if groups > 1 and (oc // groups) % ob:
            ob = kernels.out_block(oc // groups, self.lanes)
        pads = attrs.get("pads", [0, 0, 0, 0])
        geometry = {"strides": list(attrs.get("strides", [1, 1])), "pads": [pads[0], pads[1], pads[2], pads[3]],
                    "dilations": list(attrs.get("dilations", [1, 1])), "groups": groups}
        act = self._epilogue(node)
        if bits == 8:
            out = self._conv_int8(bb, node, x, w, bias, ob, geometry, act)
        else:
            out = self._conv_fp32(bb, node, x, w, bias, ob, geometry, act)
        return self._aliased(out, relax)

    def _conv_fp32(self, bb, node, x, w: np.ndarray, bias, ob: int, geometry: dict[str, Any], act: str):
        wp = self.shared(("conv", node.name, ob), lambda: self.const(kernels.pack_conv(w.astype(np.float32), ob)))
        args = [x, wp] + ([self.expr(bias.astype(np.float32))] if bias is not None else [])
        self._record(node, "conv2d", 32, w.size * 4)

        def te_conv(data, weight, *rest):
            return kernels.conv2d(data, weight, rest[0] if rest else None, **_conv_args(geometry), act=act)

        return bb.emit_te(te_conv, *args, primfunc_name_hint="bitpass_conv2d",
                          primfunc_attrs={"bitpass.kernel": "conv2d", "bitpass.nb": ob})

    def _conv_int8(self, bb, node, x, w: np.ndarray, bias, ob: int, geometry: dict[str, Any], act: str):
        """int8 weights (per output channel) × int8 activations quantized per sample: ``kernels.conv2d_int8``,
        replaced by ``avx2.conv2d_int8`` on AVX2 targets (the geometry travels as function attributes)."""
        taps = kernels.conv_int8_taps(w.shape[1], w.shape[3], geometry["dilations"][1])

        def make8():
            codes, scale = kernels.quantize_conv_int8(w.astype(np.float32), ob, taps)
            return self.const(codes), self.const(scale), codes.nbytes + scale.nbytes

        codes, scale, nbytes = self.shared(("conv8", node.name, ob), make8)
        oc = w.shape[0]
        b = bias.astype(np.float32) if bias is not None else np.zeros(oc, np.float32)
        self._record(node, "conv2d_int8", 8, nbytes)

        def te_conv8(data, cc, ss, bb_):
            return kernels.conv2d_int8(data, cc, ss, bb_, **_conv_args(geometry), act=act, taps=taps)

        attrs = {"bitpass.kernel": "conv2d_int8", "bitpass.nb": ob, "bitpass.act": act, "bitpass.taps": taps,
                 **{f"bitpass.{key}": value for key, value in geometry.items()}}
        return bb.emit_te(te_conv8, x, codes, scale, self.expr(b), primfunc_name_hint="bitpass_conv2d_int8",
                          primfunc_attrs=attrs)

    def _aliased(self, out, relax):
        """Record that a fused Relu's output is this kernel's output."""
        if self._relu_alias is not None:
            self._pending_alias, self._relu_alias = self._relu_alias[0], None
        return out

    def op_Gemm(self, bb, node, attrs, inputs):
        a, w = inputs[0], inputs[1]
        if not isinstance(w, np.ndarray):
            raise NotImplementedError(f"Gemm {node.name!r}: only constant weights are lowered")
        if attrs.get("transA", 0):
            raise NotImplementedError(f"Gemm {node.name!r}: transA is not lowered")
        w_kn = w.T if attrs.get("transB", 0) else w
        w_kn = w_kn * attrs.get("alpha", 1.0)
        bias = inputs[2] if len(inputs) > 2 else None
        if bias is not None:
            bias = np.broadcast_to(bias * attrs.get("beta", 1.0), (w_kn.shape[1],))
        return self._dense(bb, node, a, w_kn.astype(np.float32), bias)

    def op_MatMul(self, bb, node, attrs, inputs):
        from tvm import relax

        a, w = inputs
        if isinstance(w, np.ndarray) and w.ndim == 2:
            shape = self.shape_of(a)
            flat = bb.emit(relax.op.reshape(a, [int(np.prod(shape[:-1])), shape[-1]])) if len(shape) != 2 else a
            out = self._dense(bb, node, flat, w.astype(np.float32), None)
            if len(shape) != 2:
                out = bb.emit(relax.op.reshape(out, [*shape[:-1], w.shape[1]]))
            return out
        return bb.emit(relax.op.matmul(self.expr(a), self.expr(w)))

    def _dense(self, bb, node, x, w_kn: np.ndarray, bias):
        from tvm import relax

        k, n = w_kn.shape
        nb = kernels.out_block(n, self.lanes)
        bits = _meta(node, "bits.weight") or 32
        act = self._epilogue(node)
        bias_arg = [self.expr(np.ascontiguousarray(bias, np.float32))] if bias is not None else []
        if bits == 32:
            wp = self.shared(("dense", node.name), lambda: self.const(kernels.pack_dense(w_kn, nb)))
            self._record(node, "dense", 32, w_kn.size * 4)

            def te_dense(xx, ww, *rest):
                return kernels.dense(xx, ww, rest[0] if rest else None, act=act)

            out = bb.emit_te(te_dense, x, wp, *bias_arg, primfunc_name_hint="bitpass_dense",
                             primfunc_attrs={"bitpass.kernel": "dense", "bitpass.nb": nb})
        elif bits == 8:
            def make8():
                codes, scale = kernels.quantize_int8(w_kn, nb)
                return self.const(codes), self.const(scale), codes.nbytes + scale.nbytes

            codes, scale, nbytes = self.shared(("dense8", node.name), make8)
            self._record(node, "dense_int8", 8, nbytes)
            bias8 = bias_arg[0] if bias_arg else self.expr(np.zeros(n, np.float32))

            def te_dense8(xx, cc, ss, bb_):
                return kernels.dense_int8(xx, cc, ss, bb_, act=act)

            out = bb.emit_te(te_dense8, x, codes, scale, bias8, primfunc_name_hint="bitpass_dense_int8",
                             primfunc_attrs={"bitpass.kernel": "dense_int8", "bitpass.nb": nb, "bitpass.act": act})
        elif bits == 4:
            nb = kernels.int4_out_block(n, self.lanes)
            if k % INT4_BLOCK:  # the kernel reduces whole blocks: zero weights × zero inputs add nothing
                kp = -(-k // INT4_BLOCK) * INT4_BLOCK
                w_kn = np.concatenate([w_kn, np.zeros((kp - k, n), w_kn.dtype)])
                x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, kp - k]))

            def make4():
                q = kernels.quantize_int4(w_kn, nb, INT4_BLOCK)
                return self.const(q.codes), self.const(q.scales), q.nbytes

            codes, scales, nbytes = self.shared(("dense4", node.name), make4)
            self._record(node, "dense_int4", 4, nbytes)
            bias4 = bias_arg[0] if bias_arg else self.expr(np.zeros(n, np.float32))

            def te_dense4(xx, cc, ss, bb_):
                return kernels.dense_int4(xx, cc, ss, bb_, block_size=INT4_BLOCK, act=act)

            out = bb.emit_te(te_dense4, x, codes, scales, bias4, primfunc_name_hint="bitpass_dense_int4",
                             primfunc_attrs={"bitpass.kernel": "dense_int4", "bitpass.nb": nb, "bitpass.act": act})
        else:
            raise NotImplementedError(f"{node.op_type} {node.name!r}: {bits}-bit weights have no TVM kernel")
        return self._aliased(out, relax)


def _conv_args(geometry: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``kernels.conv2d`` / ``conv2d_int8`` from a Conv's geometry."""
    pads = geometry["pads"]
    return {"strides": geometry["strides"], "pads": (pads[0], pads[1], pads[2], pads[3]),
            "dilations": geometry["dilations"], "groups": geometry["groups"]}


def lower(proto: onnx.ModelProto, batches: Sequence[int], lanes: int) -> tuple[Any, LoweringReport, list[str]]:
    """A Relax IRModule with one function per batch size (``main`` for the first, ``main_b{n}`` for the
    others), the lowering report, and the function names in ``batches`` order."""
    from tvm import relax

    report = LoweringReport()
    lowering = _Lowering(proto, lanes, report)
    bb = relax.BlockBuilder()
    names = []
    for index, batch in enumerate(batches):
        name = "main" if index == 0 else f"main_b{batch}"
        lowering.report = report if index == 0 else LoweringReport()
        lowering.function(bb, batch, name)
        names.append(name)
    return bb.get(), report, names

