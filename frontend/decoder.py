"""Import a decoder language model with a KV cache: one ONNX graph for prefill and one-token decode.

The graph follows the layout ONNX Runtime GenAI uses: inputs ``input_ids`` (batch, sequence),
``attention_mask`` (batch, past + sequence) and, per layer, ``past_key_values.{i}.key`` /
``past_key_values.{i}.value`` (batch, kv_heads, past, head_dim); outputs ``logits`` (batch, sequence,
vocab) and ``present.{i}.key`` / ``present.{i}.value`` (batch, kv_heads, past + sequence, head_dim).
Prefill feeds a past of length 0; each decode step feeds one token and the previous presents.
Batch, sequence and past length are dynamic axes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitpass.frontend.errors import ModelLoadError
from bitpass.frontend.model import Model
from bitpass.frontend.torch_import import fold_weight_transposes

#: opset of the exported decoder graph (21: what ORT needs for blocked int4 Q/DQ; MatMulNBits is com.microsoft)
DECODER_OPSET = 21


@dataclass(frozen=True)
class DecoderSpec:
    """What a generation loop needs to know about a KV-cache decoder graph."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    #: 32: float cache; 8 or 4: integer codes (int8 containers), static per-channel key scales inside the
    #: graph and per-token value scales as extra ``past_key_values.{i}.value_scale`` / ``present`` tensors
    kv_bits: int = 32
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    logits: str = "logits"

    @property
    def cache_parts(self) -> tuple[str, ...]:
        return ("key", "value") if self.kv_bits >= 32 else ("key", "value", "value_scale")

    def past_names(self, layer: int) -> tuple[str, ...]:
        return tuple(f"past_key_values.{layer}.{part}" for part in self.cache_parts)

    def present_names(self, layer: int) -> tuple[str, ...]:
        return tuple(f"present.{layer}.{part}" for part in self.cache_parts)

    @property
    def input_names(self) -> list[str]:
        return [self.input_ids, self.attention_mask, *(n for i in range(self.layers) for n in self.past_names(i))]

    @property
    def output_names(self) -> list[str]:
        return [self.logits, *(n for i in range(self.layers) for n in self.present_names(i))]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero-length past tensors: the feeds of a prefill."""
        shapes = {"key": (batch, self.kv_heads, 0, self.head_dim), "value": (batch, self.kv_heads, 0, self.head_dim),
                  "value_scale": (batch, self.kv_heads, 0, 1)}
        dtypes = {"key": np.float32 if self.kv_bits >= 32 else np.int8,
                  "value": np.float32 if self.kv_bits >= 32 else np.int8, "value_scale": np.float32}
        return {f"past_key_values.{i}.{part}": np.zeros(shapes[part], dtypes[part])
                for i in range(self.layers) for part in self.cache_parts}

    def to_metadata(self) -> dict[str, str]:
        """Model-level metadata_props that let ``spec_from_model`` rebuild this spec from a saved graph."""
        return {"bitpass.decoder.layers": str(self.layers), "bitpass.decoder.kv_heads": str(self.kv_heads),
                "bitpass.decoder.head_dim": str(self.head_dim), "bitpass.decoder.vocab": str(self.vocab),
                "bitpass.decoder.max_positions": str(self.max_positions),
                "bitpass.decoder.kv_bits": str(self.kv_bits)}


def spec_from_model(model: Model) -> DecoderSpec:
    """The ``DecoderSpec`` recorded in a decoder graph's metadata (``export_decoder`` writes it)."""
    props = model.ir.metadata_props
    try:
        return DecoderSpec(*(int(props[f"bitpass.decoder.{key}"])
                             for key in ("layers", "kv_heads", "head_dim", "vocab", "max_positions")),
                           kv_bits=int(props.get("bitpass.decoder.kv_bits", "32")))
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"{model.provenance.name}: not a bitpass decoder graph (no bitpass.decoder.* "
                             "metadata): export it with bitpass.frontend.decoder.export_decoder") from err


def import_transformers() -> Any:
    """``import transformers`` even when the installed torchvision was built for another torch.

    transformers imports torchvision when it is installed; a torchvision built for another torch fails
    while registering fake kernels for its C++ operators (``operator torchvision::nms does not exist``).
    The model definitions bitpass uses need none of those operators, so their registration is retried
    with failures ignored.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        import torch

        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        original = torch.library.register_fake

        def tolerant(op: Any, func: Any = None, /, *args: Any, **kwargs: Any) -> Any:
            if func is not None:
                try:
                    return original(op, func, *args, **kwargs)
                except RuntimeError:
                    return func

            def register(f: Any) -> Any:
                try:
                    return original(op, *args, **kwargs)(f)
                except RuntimeError:
                    return f
            return register

        torch.library.register_fake = tolerant
        try:
            import torchvision  # noqa: F401
        finally:
            torch.library.register_fake = original
    except ImportError:
        pass
    import transformers

    return transformers


def decoder_spec(lm: Any) -> DecoderSpec:
    """The cache geometry of a transformers causal LM (GPT-2 and Llama-style configs)."""
    config = lm.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    width = getattr(config, "hidden_size", None) or config.n_embd
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    positions = getattr(config, "max_position_embeddings", None) or config.n_positions
    return DecoderSpec(int(layers), int(kv_heads), int(head_dim), int(config.vocab_size), int(positions))


def _wrapper(lm: Any, spec: DecoderSpec, key_scales: Any = None) -> Any:
    """An nn.Module whose forward takes the cache as explicit tensors and returns the presents as tensors
    (transformers 5 passes a ``Cache`` object, which an exported graph cannot take).

    With ``spec.kv_bits < 32`` the cache crosses the graph boundary as integer codes (KVQuant's layout):
    keys per channel with static ``key_scales`` (layers, kv_heads, head_dim) calibrated beforehand, values
    per token with a scale computed when the token enters the cache. Each step encodes only the new
    positions and appends their codes: old codes pass through unchanged (the whole cache is dequantized
    for attention, once per step).
    """
    import torch

    transformers = import_transformers()
    parts = len(spec.cache_parts)
    top = float(2 ** (spec.kv_bits - 1) - 1)

    class KVCacheDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm
            if key_scales is not None:
                scales = torch.as_tensor(np.asarray(key_scales, np.float32))
                self.register_buffer("key_scales", scales.reshape(spec.layers, 1, spec.kv_heads, 1, spec.head_dim))

        def forward(self, input_ids: Any, attention_mask: Any, past: list[Any]) -> tuple[Any, ...]:
            layers = []
            for i in range(spec.layers):
                entry = past[parts * i:parts * (i + 1)]
                if parts == 2:
                    layers.append((entry[0], entry[1]))
                else:
                    layers.append((entry[0].float() * self.key_scales[i], entry[1].float() * entry[2]))
            cache = transformers.DynamicCache(ddp_cache_data=layers)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
            present = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            outputs = [out.logits]
            for i, layer in enumerate(present.layers):
                if parts == 2:
                    outputs += [layer.keys, layer.values]
                    continue
                entry = past[parts * i:parts * (i + 1)]
                cached = entry[0].shape[2]  # only the new positions are encoded; old codes pass through
                new_keys, new_values = layer.keys[:, :, cached:], layer.values[:, :, cached:]
                keys = torch.clamp(torch.round(new_keys / self.key_scales[i]), -top, top).to(torch.int8)
                scale = torch.clamp(new_values.abs().amax(dim=-1, keepdim=True) / top, min=1e-12)
                values = torch.round(new_values / scale).to(torch.int8)
                outputs += [torch.cat([entry[0], keys], dim=2), torch.cat([entry[1], values], dim=2),
                            torch.cat([entry[2], scale], dim=2)]
            return tuple(outputs)

    return KVCacheDecoder().eval()


def export_decoder(lm: Any, *, name: str | None = None, kv_bits: int = 32,
                   key_scales: Any = None) -> tuple[Model, DecoderSpec]:
    """Export a transformers causal LM (GPT-2, Llama, ...) as one KV-cache ONNX graph -> (Model, spec).

    The attention implementation is switched to eager for the export (and restored): it exports as
    plain MatMul/Softmax that every runtime and quantizer handles. Batch, sequence and past length are
    dynamic (the example shapes avoid 0 and 1, which torch.export would fix as constants); rows of a
    batch must have the same length (no left padding: positions follow the past length).
    Layer ids are the LM's module paths (``transformer.h.0.attn.c_attn``, ``lm_head``), so a tied
    embedding and its lm_head get distinct ids and ``model.torch_module.get_submodule(id)`` finds each.

    ``kv_bits=8`` (or 4) exports a quantized cache (see ``_wrapper``); ``key_scales`` (layers, kv_heads,
    head_dim) come from calibration, e.g. ``bitpass.passes.weight_only.kvcache.key_scales``.
    """
    import dataclasses

    import torch

    spec = dataclasses.replace(decoder_spec(lm), kv_bits=kv_bits)
    if kv_bits not in (4, 8, 32):
        raise ValueError(f"a {kv_bits}-bit cache is not offered: use 8 or 4 (or 32 for a float cache)")
    if kv_bits < 32 and (key_scales is None or np.shape(key_scales) != (spec.layers, spec.kv_heads, spec.head_dim)):
        raise ValueError(f"a {kv_bits}-bit cache needs key_scales of shape {(spec.layers, spec.kv_heads, spec.head_dim)}"
                         " from calibration (bitpass.passes.weight_only.kvcache.key_scales)")
    lm = lm.eval()
    previous = getattr(lm.config, "_attn_implementation", None)
    if previous != "eager":
        lm.set_attn_implementation("eager")
    batch, sequence, past = 2, 3, 5
    examples = {"key": torch.zeros(batch, spec.kv_heads, past, spec.head_dim),
                "value": torch.zeros(batch, spec.kv_heads, past, spec.head_dim),
                "value_scale": torch.ones(batch, spec.kv_heads, past, 1)}
    if kv_bits < 32:
        examples["key"], examples["value"] = examples["key"].to(torch.int8), examples["value"].to(torch.int8)
    # one tensor object per input: torch.export treats a tensor passed twice as one aliased input
    cache = [examples[part].clone() for _ in range(spec.layers) for part in spec.cache_parts]
    args = (torch.zeros(batch, sequence, dtype=torch.long), torch.ones(batch, past + sequence, dtype=torch.long), cache)
    auto = torch.export.Dim.AUTO
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, [{0: auto, 2: auto} for _ in cache])
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _wrapper(lm, spec, key_scales), args, dynamo=True, optimize=True, opset_version=DECODER_OPSET,
                dynamic_shapes=dynamic, input_names=spec.input_names, output_names=spec.output_names,
                verbose=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"KV-cache export of {type(lm).__name__} failed: {first[:300]}") from err
    finally:
        if previous is not None and previous != "eager":
            lm.set_attn_implementation(previous)
    proto = program.model_proto
    _name_dynamic_axes(proto, spec)
    # the exporter's optimizer folds Transpose(weight) only below a size limit: nn.Linear weights and a
    # tied lm_head of a real model stay MatMul(x, Transpose(W)) without this, i.e. not quantizable layers
    fold_weight_transposes(proto)
    _gemm_to_matmul_add(proto)
    for key, value in spec.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    from bitpass.frontend.onnx_import import from_proto

    _label_layers_by_module(proto)
    model = from_proto(proto, name=name or type(lm).__name__, sha256=digest, kind="torch")
    model.torch_module = lm
    return model, spec


def _name_dynamic_axes(proto: Any, spec: DecoderSpec) -> None:
    """Readable names for the exporter's symbols on inputs and outputs: batch, sequence, past_sequence,
    total_sequence (``past_sequence + sequence``)."""
    def dims(value: Any) -> Any:
        return value.type.tensor_type.shape.dim

    inputs = {v.name: v for v in proto.graph.input}
    names = {dims(inputs[spec.input_ids])[0].dim_param: "batch", dims(inputs[spec.input_ids])[1].dim_param: "sequence"}
    first_past = spec.past_names(0)[0]
    if first_past in inputs:
        names[dims(inputs[first_past])[2].dim_param] = "past_sequence"
    for value in [*proto.graph.input, *proto.graph.output]:
        for index, dim in enumerate(dims(value)):
            if not dim.dim_param:
                continue
            if value.name == spec.attention_mask:
                dim.dim_param = "batch" if index == 0 else "total_sequence"
            elif dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
            elif value.name.startswith("present.") and index == 2:
                dim.dim_param = "total_sequence"
            elif index == 0:
                dim.dim_param = "batch"


def _gemm_to_matmul_add(proto: Any) -> None:
    """``Gemm(A, W[, b])`` (HF ``Conv1D`` exports as addmm) -> ``Add(MatMul(A, W), b)``, in place and exact.

    ONNX Runtime's weight-only quantizers (MatMulNBits) and its decoder fusions act on MatMul only.
    """
    from onnx import helper

    kept = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) not in (2, 3) \
                or attrs.get("transA", 0) or attrs.get("transB", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            kept.append(node)
            continue
        with_bias = len(node.input) == 3 and node.input[2] != ""
        product = f"{node.output[0]}_matmul" if with_bias else node.output[0]
        matmul = helper.make_node("MatMul", node.input[:2], [product], name=f"{node.name}_MatMul")
        matmul.metadata_props.extend(node.metadata_props)
        kept.append(matmul)
        if with_bias:
            kept.append(helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{node.name}_Add"))
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _label_layers_by_module(proto: Any) -> None:
    """Write each weight-bearing node's module path (from the exporter's name scopes, the wrapper's
    ``lm.`` stripped) as its bitpass layer id, before ``Model`` would fall back to initializer names
    (which call a tied embedding ``lm_head`` and the real lm_head ``lm_head#2``)."""
    import ast
    import json

    from bitpass.frontend import annotation

    constant = {t.name for t in proto.graph.initializer}
    taken: set[str] = set()
    weight_index = {"MatMul": 1, "Gemm": 1, "Gather": 0}
    for node in proto.graph.node:
        index = weight_index.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in constant:
            continue
        props = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        modules = [s for s in scopes[:-1] if isinstance(s, str) and s.startswith("lm.")]
        if modules and modules[-1][3:] not in taken:
            taken.add(modules[-1][3:])
            node.metadata_props.add(key=annotation.PREFIX + annotation.LAYER_ID, value=json.dumps(modules[-1][3:]))
