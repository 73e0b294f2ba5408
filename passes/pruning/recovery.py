"""The ``recover`` pass: a short fine-tune by distillation that wins back accuracy lost to pruning.

The student is the pruned ONNX graph itself, run in torch by a small interpreter (``GraphModule``)
whose parameters are the float weights and biases of the graph's layers and BatchNorms, so BN
folding and removed channels need no mapping back to the torch module; pruned weights stay zero
(the masks of ``prune``, or the zeros already in a weight). The teacher is the model as it was
before the first pruning pass of the pipeline (kept in the analysis cache), or, without that, the
fp32 torch module the model came from. The loss is the KL divergence between the teacher's and the
student's softened outputs (temperature ``temperature``) on the calibration inputs when they carry
labels (a classifier), else the mean squared error of the raw outputs (embeddings, ``loss=``). The recovered
weights are written back into the ONNX initializers. Off by default: a pipeline runs it only when
it names ``recover``; ``ctx.records["recovery"]`` says what it did.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import pydantic
import torch
import torch.nn.functional as F

from bitpass.frontend import Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.frontend.layers import constant_tensor
from bitpass.passes import execution
from bitpass.passes.infra import DATA_CALIBRATION, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.analyses import PRUNING_MASKS, PRUNING_REFERENCE
from bitpass.passes.pruning.common import set_constant

#: node op -> input indices whose float initializers are trained
TRAINABLE = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2)}


def _pads(node: ir.Node, spatial: int) -> list[int]:
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UsageError(f"recover: {node.op_type} node {node.name!r} uses auto_pad SAME, which the interpreter lacks")
    pads = list(node.attributes.get_ints("pads", [0] * (2 * spatial)))
    if pads[:spatial] != pads[spatial:]:
        raise UsageError(f"recover: {node.op_type} node {node.name!r} has asymmetric padding")
    return pads[:spatial]


class GraphModule(torch.nn.Module):
    """A standard-op ONNX graph evaluated with torch ops; layer weights are parameters."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.graph = model.graph
        self.params = torch.nn.ParameterList()
        self.param_of: dict[str, int] = {}
        self.constants: dict[str, torch.Tensor] = {}
        for node in self.graph:
            if node.domain not in ("", "ai.onnx"):
                raise UsageError(f"recover: the interpreter runs standard ops only, not {node.domain}::{node.op_type}")
            for i in TRAINABLE.get(node.op_type, ()):
                value = node.inputs[i] if i < len(node.inputs) else None
                if value is None or value.name in self.param_of or value.const_value is None:
                    continue
                if value.const_value.dtype != ir.DataType.FLOAT:
                    continue
                self.param_of[value.name] = len(self.params)
                self.params.append(torch.nn.Parameter(torch.from_numpy(value.const_value.numpy().copy())))
        for name, value in self.graph.initializers.items():
            if name not in self.param_of and value.const_value is not None:
                self.constants[name] = torch.from_numpy(np.array(value.const_value.numpy()))

    def _get(self, env: dict[str, torch.Tensor], value: ir.Value | None) -> torch.Tensor | None:
        if value is None or not value.name:
            return None
        if value.name in self.param_of:
            return self.params[self.param_of[value.name]]
        if value.name in env:
            return env[value.name]
        if value.name in self.constants:
            return self.constants[value.name]
        tensor = constant_tensor(value)
        if tensor is not None:
            return torch.from_numpy(np.array(tensor.numpy()))
        raise UsageError(f"recover: no value {value.name!r}")

    def forward(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(feeds)
        for node in self.graph:
            args = [self._get(env, v) for v in node.inputs]
            outs = _run(node, args)
            for value, out in zip(node.outputs, outs):
                env[value.name] = out
        return [env[v.name] for v in self.graph.outputs]


def _run(node: ir.Node, a: list[Any]) -> list[torch.Tensor]:
    op, at = node.op_type, node.attributes
    if op == "Conv":
        spatial = a[1].dim() - 2
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
        return [conv(a[0], a[1], a[2] if len(a) > 2 else None, stride=list(at.get_ints("strides", [1] * spatial)),
                     padding=_pads(node, spatial), dilation=list(at.get_ints("dilations", [1] * spatial)),
                     groups=at.get_int("group", 1))]
    if op == "Gemm":
        x = a[0].T if at.get_int("transA", 0) else a[0]
        w = a[1].T if at.get_int("transB", 0) else a[1]
        y = at.get_float("alpha", 1.0) * (x @ w)
        if len(a) > 2 and a[2] is not None:
            y = y + at.get_float("beta", 1.0) * a[2]
        return [y]
    if op == "MatMul":
        return [a[0] @ a[1]]
    if op in ("Add", "Sub", "Mul", "Div"):
        return [{"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](a[0], a[1])]
    if op == "Relu":
        return [F.relu(a[0])]
    if op == "LeakyRelu":
        return [F.leaky_relu(a[0], at.get_float("alpha", 0.01))]
    if op == "Sigmoid":
        return [torch.sigmoid(a[0])]
    if op == "Tanh":
        return [torch.tanh(a[0])]
    if op == "Clip":
        lo = a[1] if len(a) > 1 and a[1] is not None else None
        hi = a[2] if len(a) > 2 and a[2] is not None else None
        return [torch.clamp(a[0], lo, hi)]
    if op in ("Identity", "Dropout"):
        return [a[0]]
    if op == "BatchNormalization":
        return [F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, at.get_float("epsilon", 1e-5))]
    if op in ("MaxPool", "AveragePool"):
        kernel = list(at.get_ints("kernel_shape"))
        spatial = len(kernel)
        strides = list(at.get_ints("strides", [1] * spatial))
        pads = _pads(node, spatial)
        if op == "MaxPool":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return [fn(a[0], kernel, strides, pads, list(at.get_ints("dilations", [1] * spatial)),
                       ceil_mode=bool(at.get_int("ceil_mode", 0)))]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return [fn(a[0], kernel, strides, pads, ceil_mode=bool(at.get_int("ceil_mode", 0)),
                   count_include_pad=bool(at.get_int("count_include_pad", 0)))]
    if op == "GlobalAveragePool":
        return [a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True)]
    if op == "Flatten":
        axis = at.get_int("axis", 1) % max(a[0].dim(), 1)
        return [a[0].reshape(int(np.prod(a[0].shape[:axis])), -1)]
    if op == "Reshape":
        shape = [int(s) for s in a[1].tolist()]
        shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [a[0].reshape(shape)]
    if op == "Shape":
        dims = list(a[0].shape)
        start, end = at.get_int("start", 0), at.get_int("end", len(dims))
        return [torch.tensor(dims[start:end], dtype=torch.int64)]
    if op == "Squeeze":
        axes = a[1].tolist() if len(a) > 1 and a[1] is not None else None
        x = a[0]
        for axis in sorted((axes if axes is not None else [i for i, d in enumerate(x.shape) if d == 1]),
                           reverse=True):
            x = x.squeeze(axis)
        return [x]
    if op == "Unsqueeze":
        x = a[0]
        for axis in sorted(a[1].tolist()):
            x = x.unsqueeze(axis)
        return [x]
    if op == "Concat":
        return [torch.cat([t for t in a if t is not None], dim=at.get_int("axis", 0))]
    if op == "Transpose":
        perm = at.get_ints("perm", None)
        return [a[0].permute(*(list(perm) if perm else reversed(range(a[0].dim()))))]
    if op == "Softmax":
        return [torch.softmax(a[0], dim=at.get_int("axis", -1))]
    if op == "LayerNormalization":
        axis = at.get_int("axis", -1) % a[0].dim()
        bias = a[2] if len(a) > 2 else None
        return [F.layer_norm(a[0], a[0].shape[axis:], a[1], bias, at.get_float("epsilon", 1e-5))]
    if op == "Gelu":
        return [F.gelu(a[0], approximate=at.get_string("approximate", "none"))]
    if op in ("Erf", "Sqrt", "Exp", "Neg"):
        return [{"Erf": torch.erf, "Sqrt": torch.sqrt, "Exp": torch.exp, "Neg": torch.neg}[op](a[0])]
    if op == "Pow":
        return [torch.pow(a[0], a[1])]
    if op == "ReduceMean":  # axes: an input from opset 18, an attribute before
        axes = a[1].tolist() if len(a) > 1 and a[1] is not None else at.get_ints("axes", None)
        keep = bool(at.get_int("keepdims", 1))
        if not axes:
            if at.get_int("noop_with_empty_axes", 0):
                return [a[0]]
            axes = list(range(a[0].dim()))
        return [a[0].mean(dim=tuple(int(x) for x in axes), keepdim=keep)]
    if op == "Constant":
        if "value" in at:
            return [torch.from_numpy(np.array(at["value"].as_tensor().numpy()))]
        for key, dtype in (("value_ints", torch.int64), ("value_int", torch.int64), ("value_floats", torch.float32),
                           ("value_float", torch.float32)):
            if key in at:
                return [torch.tensor(at[key].value, dtype=dtype)]
        raise UsageError(f"recover: Constant node {node.name!r} has no value the interpreter reads")
    if op == "Gather":
        return [torch.index_select(a[0], at.get_int("axis", 0), a[1].reshape(-1).long()).reshape(
            *a[0].shape[:at.get_int("axis", 0)], *a[1].shape, *a[0].shape[at.get_int("axis", 0) + 1:])]
    raise UsageError(f"recover: the torch interpreter has no {op} (node {node.name!r})")


class RecoverConfig(PassConfig):
    #: the calibration set is small (hundreds of samples): many cheap epochs (about 2 s on the digits CNN)
    epochs: int = pydantic.Field(20, ge=1)
    lr: float = pydantic.Field(2e-3, gt=0)
    batch_size: int = pydantic.Field(32, ge=1)
    #: distillation loss: kl (softened outputs, for classifiers), mse (raw outputs, for embeddings);
    #: auto = kl when the calibration data carries labels, else mse
    loss: Literal["auto", "kl", "mse"] = "auto"
    #: softening temperature of the kl loss
    temperature: float = pydantic.Field(2.0, gt=0)
    #: calibration samples used (default: all)
    samples: int | None = pydantic.Field(None, ge=1)


class Recover(Pass):
    """Fine-tune a pruned model for a few epochs by distillation from its unpruned self (masks kept)."""

    name = "recover"
    Config = RecoverConfig
    requires = frozenset({DATA_CALIBRATION})
    config: RecoverConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        if ctx.calibration is None:
            raise UsageError("recover needs calibration data (--calib FILE)")
        data = ctx.calibration if cfg.samples is None else ctx.calibration.head(cfg.samples)
        start = time.perf_counter()
        inputs = {s.name: torch.from_numpy(np.ascontiguousarray(data.inputs[s.name])) for s in model.inputs}
        teacher, source = self._teacher(model, ctx, data)
        student = GraphModule(model)
        masks = self._masks(model, ctx, student)
        generator = torch.Generator().manual_seed(int(ctx.seed))
        optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        n, temp = len(data), cfg.temperature
        kind = cfg.loss if cfg.loss != "auto" else ("kl" if data.labels is not None else "mse")

        def loss_of(index: torch.Tensor) -> torch.Tensor:
            out = student(**{k: v[index] for k, v in inputs.items()})[0]
            out = out.reshape(-1, out.shape[-1])
            target = teacher[index].reshape(-1, out.shape[-1])
            if kind == "mse":
                return F.mse_loss(out, target)
            return F.kl_div(F.log_softmax(out / temp, -1), F.log_softmax(target / temp, -1), log_target=True,
                            reduction="batchmean") * temp * temp

        everything = torch.arange(n)
        with torch.no_grad():
            before = float(loss_of(everything))
        student.train()
        for _ in range(cfg.epochs):
            for index in torch.randperm(n, generator=generator).split(cfg.batch_size):
                optimizer.zero_grad()
                loss_of(index).backward()
                optimizer.step()
                with torch.no_grad():
                    for i, mask in masks.items():
                        student.params[i].mul_(mask)
        with torch.no_grad():
            after = float(loss_of(everything))
        for name, i in student.param_of.items():
            set_constant(model.graph.initializers[name], student.params[i].detach().numpy().astype(np.float32))
        for layer in model.layers():  # masks kept: sparsity annotations stay true
            if annotation.sparsity(layer.node) is not None:
                zeros = float(np.mean(layer.weight_array == 0))
                annotation.set_sparsity(layer.node, min(zeros, 0.999999))
        ctx.records["recovery"] = {
            "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "loss": kind,
            **({"temperature": temp} if kind == "kl" else {}),
            "samples": n, "teacher": source, "masked_weights": len(masks),
            "distillation_loss_before": round(before, 6), "distillation_loss_after": round(after, 6),
            "seconds": round(time.perf_counter() - start, 3),
        }
        ctx.progress(f"recover: distillation loss {before:.4f} -> {after:.4f} in {cfg.epochs} epochs")
        return PassResult(model, modified=True, preserved=frozenset({PRUNING_MASKS, PRUNING_REFERENCE}))

    @staticmethod
    def _teacher(model: Model, ctx: PassContext, data: Any) -> tuple[torch.Tensor, str]:
        if ctx.analyses.cached(PRUNING_REFERENCE):
            outputs = execution.predict(ctx.analyses.require(PRUNING_REFERENCE), data, batch_size=256)
            return torch.from_numpy(outputs), "the model before pruning (ONNX Runtime)"
        if model.torch_module is not None:
            module = model.torch_module
            was = module.training
            module.eval()
            with torch.no_grad():
                out = module(*(torch.from_numpy(data.inputs[s.name]) for s in model.inputs))
            module.train(was)
            out = out[0] if isinstance(out, (list, tuple)) else out
            return out.detach(), "the fp32 torch module"
        raise UsageError("recover needs the unpruned model as teacher: run it after prune or prune-channels in the "
                         "same pipeline (or on a model imported from torch)")

    @staticmethod
    def _masks(model: Model, ctx: PassContext, student: GraphModule) -> dict[int, torch.Tensor]:
        cached = ctx.analyses.require(PRUNING_MASKS) if ctx.analyses.cached(PRUNING_MASKS) else {}
        masks = {}
        for layer in model.layers():
            i = student.param_of.get(layer.weight.name or "")
            if i is None:
                continue
            mask = cached.get(layer.id)
            if mask is None or mask.shape != layer.weight_shape:
                if not annotation.sparsity(layer.node):
                    continue
                mask = layer.weight_array != 0
            masks[i] = torch.from_numpy(np.asarray(mask, dtype=np.float32))
        return masks

