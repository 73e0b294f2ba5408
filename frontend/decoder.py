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
import dataclasses
import io
import json
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitpass.frontend.errors import ModelLoadError
from bitpass.frontend.model import Model, proto_sha256
from bitpass.frontend.torch_import import fold_weight_transposes

#: opset of the exported decoder graph (21: what ORT needs for blocked int4 Q/DQ; MatMulNBits is com.microsoft)
DECODER_OPSET = 21


@dataclass(frozen=True)
class DecoderSpec:
    """What a generation loop needs to know about a decoder graph: its cache geometry and tensor names.

    The names default to ONNX Runtime GenAI's (what ``export_decoder`` writes); ``detect_decoder`` fills them in
    for other exporters' graphs (transformers' own ONNX exporter names the cache ``past_key_values.layers.{i}.keys``
    / ``cache.layers.{i}.keys``). ``layers == 0`` is a language model without a cache (``use_cache=False``
    exports): each generated token reruns the whole sequence.
    """

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    #: the longest sequence the model takes (positions table); 0 when the graph does not say
    max_positions: int
    #: 32: float cache; 8 or 4: integer codes (int8 containers), static per-channel key scales inside the
    #: graph and per-token value scales as extra ``past_key_values.{i}.value_scale`` / ``present`` tensors
    kv_bits: int = 32
    input_ids: str = "input_ids"
    #: None when the graph takes no mask (then nothing is fed for it)
    attention_mask: str | None = "attention_mask"
    logits: str = "logits"
    #: fed ``past + arange(sequence)`` when the graph takes it
    position_ids: str | None = None
    #: every cache input, layer by layer, in ``cache_parts`` order; empty: GenAI's names
    past: tuple[str, ...] = ()
    #: the output that becomes each ``past`` entry at the next step (same order)
    present: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # no names given: GenAI's, written out (the manifest lists them)
        if self.layers and not self.past:
            object.__setattr__(self, "past", tuple(n for i in range(self.layers) for n in self.past_names(i)))
        if self.layers and not self.present:
            object.__setattr__(self, "present", tuple(n for i in range(self.layers) for n in self.present_names(i)))

    @property
    def cache_parts(self) -> tuple[str, ...]:
        return ("key", "value") if self.kv_bits >= 32 else ("key", "value", "value_scale")

    def past_names(self, layer: int) -> tuple[str, ...]:
        parts = len(self.cache_parts)
        if self.past:
            return self.past[parts * layer:parts * (layer + 1)]
        return tuple(f"past_key_values.{layer}.{part}" for part in self.cache_parts)

    def present_names(self, layer: int) -> tuple[str, ...]:
        parts = len(self.cache_parts)
        if self.present:
            return self.present[parts * layer:parts * (layer + 1)]
        return tuple(f"present.{layer}.{part}" for part in self.cache_parts)

    @property
    def all_past(self) -> list[str]:
        return [n for i in range(self.layers) for n in self.past_names(i)]

    @property
    def all_present(self) -> list[str]:
        return [n for i in range(self.layers) for n in self.present_names(i)]

    @property
    def token_inputs(self) -> list[str]:
        """The inputs besides the cache: token ids, and the mask and positions when the graph takes them."""
        return [n for n in (self.input_ids, self.attention_mask, self.position_ids) if n]

    @property
    def input_names(self) -> list[str]:
        return [*self.token_inputs, *self.all_past]

    @property
    def output_names(self) -> list[str]:
        return [self.logits, *self.all_present]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero-length past tensors: the feeds of a prefill."""
        shapes = {"key": (batch, self.kv_heads, 0, self.head_dim), "value": (batch, self.kv_heads, 0, self.head_dim),
                  "value_scale": (batch, self.kv_heads, 0, 1)}
        dtypes = {"key": np.float32 if self.kv_bits >= 32 else np.int8,
                  "value": np.float32 if self.kv_bits >= 32 else np.int8, "value_scale": np.float32}
        return {name: np.zeros(shapes[part], dtypes[part])
                for i in range(self.layers) for name, part in zip(self.past_names(i), self.cache_parts)}

    def feeds(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every input of one step: ``ids`` (batch, sequence) after ``past`` (default: empty, a prefill)."""
        ids = np.asarray(ids, dtype=np.int64)
        past = self.empty_past(ids.shape[0]) if past is None else past
        cached = past[self.past_names(0)[0]].shape[2] if self.layers and past else 0
        feeds = {self.input_ids: ids, **past}
        if self.attention_mask:
            feeds[self.attention_mask] = np.ones((ids.shape[0], cached + ids.shape[1]), np.int64)
        if self.position_ids:
            feeds[self.position_ids] = np.broadcast_to(np.arange(cached, cached + ids.shape[1], dtype=np.int64),
                                                       ids.shape).copy()
        return feeds

    def to_metadata(self) -> dict[str, str]:
        """Model-level metadata_props that let ``spec_from_model`` rebuild this spec from a saved graph."""
        return {"bitpass.decoder": json.dumps(self.to_json(), sort_keys=True)}

    def to_json(self) -> dict[str, Any]:
        """The spec as plain JSON (the manifest's ``decoder`` record)."""
        record = dataclasses.asdict(self)
        record["past"], record["present"] = list(self.past), list(self.present)
        return record

    @classmethod
    def from_json(cls, record: Any) -> DecoderSpec:
        """The spec ``to_json`` wrote; ``ValueError`` for anything else."""
        if not isinstance(record, dict):
            raise ValueError("a decoder record is a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(record) - set(fields)
        if unknown:
            raise ValueError(f"unknown decoder fields {sorted(unknown)[:3]}")
        values: dict[str, Any] = {}
        for name, value in record.items():
            if name in ("past", "present"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"decoder field {name} must be a list of names")
                value = tuple(value)
            elif name in ("attention_mask", "position_ids"):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"decoder field {name} must be a name or null")
            elif name in ("input_ids", "logits"):
                if not isinstance(value, str):
                    raise ValueError(f"decoder field {name} must be a name")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"decoder field {name} must be a non-negative integer")
            values[name] = value
        spec = cls(**values)
        if len(spec.past) != len(spec.present) or (spec.past and len(spec.past) != spec.layers * len(spec.cache_parts)):
            raise ValueError("the decoder's past and present names do not pair up layer by layer")
        return spec


def spec_from_model(model: Model) -> DecoderSpec:
    """The decoder's ``DecoderSpec``: recorded in the graph's metadata (``export_decoder``, and every artifact
    bitpass compiles from a decoder, write it), else read off the graph's inputs and outputs."""
    props = model.ir.metadata_props
    if "bitpass.decoder" in props:
        try:
            return DecoderSpec.from_json(json.loads(props["bitpass.decoder"]))
        except (ValueError, TypeError) as err:
            raise ModelLoadError(f"{model.provenance.name}: its bitpass.decoder metadata is damaged ({err}): "
                                 "re-export the model") from err
    spec = detect_decoder(model)
    if spec is None:
        raise ModelLoadError(f"{model.provenance.name}: not a decoder language model (no int64 token-id input and "
                             "logits output with a sequence axis): export it with "
                             "bitpass.frontend.decoder.export_decoder")
    return spec


def lm_spec(model: Model) -> DecoderSpec | None:
    """``spec_from_model`` for a language model, None for any other model (a damaged record is an error)."""
    try:
        return spec_from_model(model)
    except ModelLoadError:
        if "bitpass.decoder" in model.ir.metadata_props:
            raise
        return None


# --- recognizing a decoder graph -------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"(?<![A-Za-z])(\d+)(?![A-Za-z])")


def _cache_role(name: str) -> tuple[int, str] | None:
    """(layer index, key|value|value_scale) of a cache tensor name such as ``past_key_values.3.key``,
    ``present.3.value``, ``past_key_values.layers.3.keys``, ``cache.layers.3.values``; None otherwise."""
    lower = name.lower()
    found = _LAYER_INDEX.findall(lower)
    if len(found) != 1:
        return None
    tail = lower.rsplit(found[0], 1)[1]
    if "scale" in tail:
        part = "value_scale"
    elif re.search(r"(^|[^a-z])keys?($|[^a-z])", tail) or tail.endswith(("key", "keys", "_k", ".k")):
        part = "key"
    elif re.search(r"(^|[^a-z])values?($|[^a-z])", tail) or tail.endswith(("value", "values", "_v", ".v")):
        part = "value"
    else:
        return None
    return int(found[0]), part


def _dim(shape: Any, axis: int) -> int | None:
    if shape is None or len(shape) <= axis:
        return None
    value = shape[axis]
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():  # transformers' exporter writes static dims as symbols "2"
        return int(value)
    return None


def detect_decoder(model: Model) -> DecoderSpec | None:
    """A ``DecoderSpec`` for a graph that looks like a causal language model, else None.

    It must take int64 token ids ``(batch, sequence)`` and give logits ``(batch, sequence, vocab)``. A KV cache
    is recognized by rank-4 inputs and outputs whose names carry a layer number and key/value (``past...`` in,
    ``present...``/``cache...`` out) that pair up one to one; a mask and position ids are recognized by name.
    Any other input makes it "not a decoder" (bitpass could not feed it).
    """
    inputs = {spec.name: spec for spec in model.inputs}
    outputs = {spec.name: spec for spec in model.outputs}
    token = [s for s in inputs.values() if np.issubdtype(s.dtype, np.integer) and s.shape is not None
             and len(s.shape) == 2]
    ids = next((s.name for s in token if "input_ids" in s.name.lower()), None) \
        or next((s.name for s in token if re.search(r"(token|ids)", s.name.lower())), None)
    if ids is None:
        return None
    logits = [s for s in outputs.values() if s.shape is not None and len(s.shape) == 3
              and np.issubdtype(s.dtype, np.floating)]
    head = next((s for s in logits if "logit" in s.name.lower()), None) or (logits[0] if logits else None)
    vocab = _dim(head.shape, 2) if head is not None else None
    if head is None or not vocab:
        return None
    table = _token_table_rows(model, ids)  # logits score the vocabulary; an encoder's hidden states do not
    if (table and vocab != table) or (not table and "logit" not in head.name.lower()):
        return None
    mask = next((s.name for s in token if s.name != ids and "mask" in s.name.lower()), None)
    positions = next((s.name for s in token if s.name not in (ids, mask) and "position" in s.name.lower()), None)
    past: dict[tuple[int, str], str] = {}
    for name, spec in inputs.items():
        if name in (ids, mask, positions):
            continue
        role = _cache_role(name) if spec.shape is not None and len(spec.shape) == 4 else None
        if role is None or role in past:
            return None  # an input bitpass cannot feed
        past[role] = name
    present: dict[tuple[int, str], str] = {}
    for name, spec in outputs.items():
        role = _cache_role(name) if name != head.name and spec.shape is not None and len(spec.shape) == 4 else None
        if role is not None:
            present.setdefault(role, name)
    props = model.ir.metadata_props
    kv_bits = 8 if any(inputs[n].dtype == np.int8 for n in past.values()) else 32
    if "bitpass.decoder.kv_bits" in props and props["bitpass.decoder.kv_bits"].isdigit():  # older bitpass exports
        kv_bits = int(props["bitpass.decoder.kv_bits"])
    positions_table = int(props["bitpass.decoder.max_positions"]) \
        if props.get("bitpass.decoder.max_positions", "").isdigit() else _position_table_rows(model, ids)
    if not past:
        if _dim(inputs[ids].shape, 1) is not None:
            return None  # a fixed sequence length and no cache: nothing can be generated with it, token by token
        return DecoderSpec(0, 0, 0, vocab, positions_table, 32, ids, mask, head.name, positions)
    parts = ("key", "value") if kv_bits >= 32 else ("key", "value", "value_scale")
    layers = sorted({layer for layer, _ in past})
    if layers != list(range(len(layers))) or set(past) != {(i, p) for i in layers for p in parts} \
            or not set(past) <= set(present):
        return None
    first_key = past[(0, "key")]
    kv_heads = _dim(inputs[first_key].shape, 1) or _dim(outputs[present[(0, "key")]].shape, 1)
    head_dim = _dim(inputs[first_key].shape, 3) or _dim(outputs[present[(0, "key")]].shape, 3)
    if not kv_heads or not head_dim:
        return None
    order = [(i, p) for i in layers for p in parts]
    return DecoderSpec(len(layers), kv_heads, head_dim, vocab, positions_table, kv_bits, ids, mask, head.name,
                       positions, tuple(past[r] for r in order), tuple(present[r] for r in order))


def complete_lm_inputs(arrays: dict[str, np.ndarray], spec: DecoderSpec, *,
                       where: str = "data") -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A language model's calibration or evaluation arrays as full feeds: token ids ``(samples, length)`` are all
    a user gives; a missing attention mask becomes ones, missing position ids ``arange(length)``, and every cache
    input an empty past ``(samples, kv_heads, 0, head_dim)`` (each sample is one prefill). Per-token ``labels``
    ``(samples, length)`` are taken out and returned beside the feeds (transformers' alignment: the target of
    position t is ``labels[:, t + 1]``; -100 ignored). Returns ``(feeds, labels or None)``."""
    from bitpass.frontend.errors import DataError

    arrays = dict(arrays)
    labels = arrays.pop("labels", None)
    ids = arrays.get(spec.input_ids)
    if ids is None:
        raise DataError(f"{where}: no {spec.input_ids!r} array: a language model's data is token ids, "
                        f"(samples, length) integers under {spec.input_ids!r}")
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{where}: {spec.input_ids!r} has shape {ids.shape} of {ids.dtype}; give (samples, length) "
                        f"integer token ids")
    if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab):
        raise DataError(f"{where}: token ids range from {ids.min()} to {ids.max()}, but the model's vocabulary is "
                        f"0..{spec.vocab - 1}")
    count, length = ids.shape
    if spec.max_positions and length > spec.max_positions:
        raise DataError(f"{where}: windows of {length} tokens exceed the model's {spec.max_positions} positions; "
                        f"use shorter windows")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != ids.shape:
            raise DataError(f"{where}: 'labels' has shape {labels.shape}; a language model's labels are per token, "
                            f"shaped like {spec.input_ids!r} {ids.shape} (or leave them out: the next input token "
                            f"is the target)")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{where}: 'labels' must be integer token ids (-100 for none), not {labels.dtype}")
    if spec.attention_mask and spec.attention_mask not in arrays:
        arrays[spec.attention_mask] = np.ones((count, length), np.int64)
    if spec.position_ids and spec.position_ids not in arrays:
        arrays[spec.position_ids] = np.broadcast_to(np.arange(length, dtype=np.int64), (count, length)).copy()
    for name, value in spec.empty_past(count).items():
        arrays.setdefault(name, value)
    return arrays, labels


def _token_table_rows(model: Model, ids: str) -> int:
    """Rows of the embedding table the token ids index (the vocabulary), 0 when none is found."""
    from bitpass.frontend.layers import constant_tensor

    for node in model.graph:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.inputs) >= 2 \
                and node.inputs[1] is not None and node.inputs[1].name == ids:
            table = constant_tensor(node.inputs[0])
            if table is not None and len(table.shape) == 2:
                return int(table.shape[0])
    return 0


def _position_table_rows(model: Model, ids: str) -> int:
    """Rows of a learned position-embedding table (a constant 2-D table gathered by anything but the token ids),
    the longest sequence the model takes; 0 when there is none (rotary positions have no such limit)."""
    from bitpass.frontend.layers import constant_tensor

    rows = []
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        table, indices = constant_tensor(node.inputs[0]), node.inputs[1]
        if table is None or len(table.shape) != 2 or indices is None or indices.name == ids:
            continue
        rows.append(int(table.shape[0]))
    return min(rows) if rows else 0


def is_causal_lm(module: Any) -> bool:
    """A transformers causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``...): what ``export_decoder`` exports."""
    config = getattr(module, "config", None)
    return (config is not None and callable(getattr(module, "get_output_embeddings", None))
            and type(module).__name__.endswith(("LMHeadModel", "ForCausalLM"))
            and getattr(config, "vocab_size", None) is not None)


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

    import torch

    spec = dataclasses.replace(decoder_spec(lm), kv_bits=kv_bits, past=(), present=())  # names for these parts
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
    digest = proto_sha256(proto)
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
