"""Transformer fusions from ONNX Runtime's transformer optimizer, as a pass of the ORT pipeline.

``onnxruntime.transformers.optimizer`` (what Olive runs by default) recognises BERT/GPT-2-class
subgraphs and replaces them by ORT's fused kernels: Attention (Q, K and V projections, scores,
softmax and the mask in one op), SkipLayerNormalization (residual Add + LayerNorm, bias folded in),
BiasGelu / FastGelu, EmbedLayerNormalization (the three embedding lookups, their sum and LayerNorm).
ORT's session-level optimizer already does some of these for plain exports; which helps depends on
the exporter's graph and the CPU, so the pass can time both on the target and keep the fused graph
only when it is not slower (``keep=auto``; the record says what was measured).

Layer ids: nodes the optimizer leaves alone keep their metadata (bitpass annotations included).
Attention swallows the Q, K and V projections (one concatenated weight) and EmbedLayerNormalization
the embedding tables: those layers would no longer be quantizable units. So ``attention`` and
``embed_layer_norm`` are off by default, for pipelines that quantize afterwards (the MatMuls keep
their ids; the Gelu fusions take only non-layer nodes), and the ``optimize`` pipeline (fp32) turns
them on; the record lists the layers a fusion took (``swallowed_layers``), and the fused node carries
the first of their ids.

SkipLayerNormalization follows ``attention`` unless set (``skip_layer_norm``) or ``session_fusions`` is on (then
never offline): on the real-weight sentence
encoder (6 x 384, CPU B, 2 threads, alternating runs on a busy machine) dynamic int8 of the graph with the
offline SkipLayerNorm ran 1.97x / 1.94x fp32 at batch 1 / 16, without it 2.44x / 2.38x (ORT's own
``quantize_dynamic`` 2.22x / 2.32x), so quantizing pipelines do not fuse it offline. Note: ORT's session
optimizer fuses SkipLayerNorm itself at load when the residual Add's input shapes are known, which bitpass's
artifacts carry. Whether that pays is timed per model: by the format search for quantized artifacts, and here
with ``session_fusions`` (the ``optimize`` pipeline, which ends with this pass): the sentence encoder's
``optimize`` artifact measured 1.06x faster with ORT's SkipLayerNormFusion off (quiet, batch 1 and 8).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from bitpass.frontend import Model, Provenance, annotation
from bitpass.frontend.model import drop_pages_of
from bitpass.passes.execution import first_line, quiet
from bitpass.passes.infra import Pass, PassConfig, PassContext, PassResult

#: ops whose presence makes a graph worth handing to the transformer optimizer
_MARKERS = ("LayerNormalization", "Softmax")
#: the fused ops the optimizer reports, for the record
FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "LayerNormalization",
             "SimplifiedLayerNormalization", "GemmFastGelu", "RotaryEmbedding")


def looks_like_transformer(model: Model) -> bool:
    """LayerNorm and Softmax and a MatMul layer: the subgraphs the optimizer fuses can be there."""
    ops = {node.op_type for node in model.graph.all_nodes()}
    return all(op in ops for op in _MARKERS) and any(layer.op_type in ("MatMul", "Gemm") for layer in model.layers())


def fuse_transformer(model: Model, *, model_type: str = "bert", attention: bool = False,
                     embed_layer_norm: bool = False, skip_layer_norm: bool | None = None, num_heads: int = 0,
                     hidden_size: int = 0) -> tuple[Model, dict[str, Any]]:
    """The model with ORT's transformer fusions applied (``model`` is untouched), and what was fused.

    ``skip_layer_norm`` None follows ``attention`` (see the module docstring: offline SkipLayerNorm slows
    dynamic int8 down, so only fp32 pipelines fuse it)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    options.enable_attention = attention
    options.enable_embed_layer_norm = embed_layer_norm
    options.enable_skip_layer_norm = attention if skip_layer_norm is None else skip_layer_norm
    before = {layer.id for layer in model.layers()}
    # The optimizer gets the graph without its large weights (type and shape kept): a GPT-2-small-size model's
    # 650 MB otherwise cost the optimizer 1.9 GB of copies, and the fused graph a second copy of every weight. Only
    # the attention fusion reads a large weight (it concatenates Q, K and V): when it fails for want of one, the
    # optimizer runs again on the whole model. The weights come back from ``model`` by name, shared (no copy).
    try:
        proto, stats, stripped = _optimize(model, model_type, options, num_heads, hidden_size, strip=True)
    except Exception:  # noqa: BLE001 - a fusion needed a stripped weight (or failed anyway: tried once more)
        proto, stats, stripped = _optimize(model, model_type, options, num_heads, hidden_size, strip=False)
    _import_domains(proto)
    fused_ir = ir.serde.deserialize_model(proto)
    if stripped:
        _restore_initializers(fused_ir, model, stripped)
    fused_model = Model(fused_ir, Provenance(model.provenance.kind, model.provenance.name, model.provenance.sha256,
                                             list(model.provenance.notes)), model.torch_module)
    swallowed = sorted(before - {layer.id for layer in fused_model.layers()})
    if swallowed:
        _mark_fused_nodes(model, fused_model, swallowed)
    return fused_model, {"fused": stats, "swallowed_layers": swallowed}


def _optimize(model: Model, model_type: str, options: Any, num_heads: int, hidden_size: int, *,
              strip: bool) -> tuple[onnx.ModelProto, dict[str, int], set[str]]:
    """ORT's optimizer at opt_level 0 on ``model``'s proto (its large initializers stubbed when ``strip``): the
    optimized proto, the fused-operator counts, and the names of the stubbed initializers."""
    from onnxruntime.transformers.optimizer import optimize_model

    proto, stripped = _proto_without_large_weights(model) if strip else (model.to_proto(), set())
    with quiet():
        # the proto itself, not a saved file: at opt_level 0 the optimizer only rewrites the proto it is given
        optimized = optimize_model(proto, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                   optimization_options=options, opt_level=0)
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
    return optimized.model, stats, stripped


#: initializers with at least this many elements are left out of the proto the optimizer sees
_STRIP_ELEMENTS = 1 << 14
_STRIPPED_LOCATION = "bitpass-stripped-initializer"


def _proto_without_large_weights(model: Model) -> tuple[onnx.ModelProto, set[str]]:
    """``model`` serialized with every large initializer an external-data stub (type and shape kept, no data), and
    their names: the weights are never copied into the proto (``to_proto`` then stripping held them once more)."""
    work = model.ir.clone()  # shares the tensors: only the clone's values take stubs
    stripped = set()
    for value in work.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and value.name and int(np.prod(tensor.shape.numpy(), dtype=np.int64)) >= _STRIP_ELEMENTS:
            value.const_value = ir.ExternalTensor(_STRIPPED_LOCATION, 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name)
            stripped.add(value.name)
    return ir.serde.serialize_model(work), stripped


def _restore_initializers(fused: ir.Model, original: Model, stripped: set[str]) -> None:
    """Give the fused graph's stub initializers back the original model's tensors (the same objects: no copy)."""
    originals = original.ir.graph.initializers
    for name, value in fused.graph.initializers.items():
        if name not in stripped:
            continue
        source = originals.get(name)
        if source is None or source.const_value is None:
            raise RuntimeError(f"fuse-transformer: the optimizer renamed or rewrote the large initializer {name!r}")
        value.const_value = source.const_value


def _import_domains(proto: onnx.ModelProto) -> None:
    """The optimizer writes com.microsoft nodes without always importing the domain (it does so on save only)."""
    imported = {entry.domain for entry in proto.opset_import}
    for domain in sorted({node.domain for node in proto.graph.node} - imported - {"", "ai.onnx"}):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def _mark_fused_nodes(before: Model, after: Model, swallowed: list[str]) -> None:
    """Give each fused node that took a layer's weight the first such layer's id (its annotations follow)."""
    weights = {}
    for layer in before.layers():
        if layer.id in swallowed:
            weights[layer.id] = layer.weight_array
    notes = {layer.id: annotation.all_of(layer.node) for layer in before.layers() if layer.id in swallowed}
    taken: set[str] = set()
    for node in after.graph.all_nodes():
        if node.domain not in ("com.microsoft",) or annotation.layer_id(node) is not None:
            continue
        consts = [v.const_value.numpy() for v in node.inputs if v is not None and v.const_value is not None]
        for layer_id, weight in weights.items():
            if layer_id in taken:
                continue
            if any(_contains(c, weight) for c in consts):
                for key, value in notes[layer_id].items():
                    annotation.set(node, key, value)
                taken.add(layer_id)
                break
    for model in (before, after):
        drop_pages_of(model)  # the paged-out weights compared here are not kept resident (``PagedWeights``)


def _contains(const: np.ndarray, weight: np.ndarray) -> bool:
    """Whether ``weight`` is (a slice of) ``const``: an Attention's QKV weight concatenates three projections."""
    if const.ndim != weight.ndim or const.dtype != weight.dtype:
        return False
    if const.shape == weight.shape:
        return bool(np.array_equal(const, weight))
    if const.ndim == 2 and const.shape[0] == weight.shape[0] and const.shape[1] % weight.shape[1] == 0:
        return bool(np.array_equal(const[:, :weight.shape[1]], weight))
    return False


class FuseTransformerConfig(PassConfig):
    #: the optimizer's model type (bert covers BERT, RoBERTa, DistilBERT-style encoders; gpt2 decoders)
    model_type: Literal["auto", "bert", "gpt2", "bart", "t5", "vit"] = "auto"
    #: fuse attention into one Attention op (swallows the Q/K/V projection layers: for fp32 pipelines)
    attention: bool = False
    #: fuse the embedding lookups, their sum and LayerNorm (swallows the embedding tables)
    embed_layer_norm: bool = False
    #: fuse residual Add + LayerNorm offline (None: as ``attention``; slower under dynamic int8 when offline)
    skip_layer_norm: bool | None = None
    #: heads and hidden size (0: the optimizer detects them from the graph)
    num_heads: int = 0
    hidden_size: int = 0
    #: auto: when the target times whole models, keep the fused graph only if it is not slower than the
    #: unfused one; always: keep it untimed
    keep: Literal["auto", "always"] = "auto"
    #: also time ORT's own load-time fusions of the result and turn off those that make it slower (for pipelines
    #: that end here, such as ``optimize``: a quantizing pipeline's format search makes that choice later)
    session_fusions: bool = False


class FuseTransformer(Pass):
    """ONNX Runtime's transformer fusions (SkipLayerNorm, BiasGelu/FastGelu; Attention, EmbedLayerNorm on request)."""

    name = "fuse-transformer"
    Config = FuseTransformerConfig
    in_place = False
    config: FuseTransformerConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        result = self._fuse(model, ctx)
        probe = (ctx.target.options or {}).get("latency_probe")
        if not self.config.session_fusions or ctx.target.backend != "onnxruntime" or not hasattr(probe, "graphs") \
                or ctx.calibration is None:
            return result
        from bitpass.passes.format_search import choose_session_fusions

        kept = result.model if result.modified else model.clone()  # the choice is model metadata: not on the input
        fusions = choose_session_fusions(kept, ctx.calibration, probe, batches=_timing_batches(model),
                                         progress=lambda m: ctx.progress(f"fuse-transformer: {m}"))
        if not fusions and not result.modified:
            return result
        ctx.records.setdefault("transformer_fusion", {})["session_fusions"] = fusions
        return PassResult(kept, modified=True, preserved=frozenset())

    def _skip_layer_norm(self) -> bool | None:
        """Offline SkipLayerNorm fusion: not when ORT's own load-time fusion is timed (``session_fusions``): ORT
        makes the same node at load unless turned off, and turning it off is only possible for the one it makes."""
        cfg = self.config
        return False if cfg.skip_layer_norm is None and cfg.session_fusions else cfg.skip_layer_norm

    def _fuse(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        if ctx.target.backend != "onnxruntime":  # com.microsoft contrib ops: only ONNX Runtime runs them
            ctx.records["transformer_fusion"] = {"applied": False, "why": f"ONNX Runtime's contrib operators; the "
                                                                          f"{ctx.target.backend} backend lowers the "
                                                                          f"unfused graph itself"}
            return PassResult(model, modified=False, preserved=frozenset())
        if cfg.model_type == "auto" and not looks_like_transformer(model):
            ctx.records["transformer_fusion"] = {"applied": False, "why": "no transformer subgraph (LayerNorm, "
                                                                          "Softmax and MatMul layers)"}
            return PassResult(model, modified=False, preserved=frozenset())
        model_type = "bert" if cfg.model_type == "auto" else cfg.model_type
        try:
            fused, record = fuse_transformer(model, model_type=model_type, attention=cfg.attention,
                                             embed_layer_norm=cfg.embed_layer_norm,
                                             skip_layer_norm=self._skip_layer_norm(), num_heads=cfg.num_heads,
                                             hidden_size=cfg.hidden_size)
        except Exception as err:  # the optimizer is an optimization: an unrecognised graph stays as it is
            ctx.records["transformer_fusion"] = {"applied": False, "why": f"the optimizer failed: {first_line(err)}"}
            ctx.progress(f"fuse-transformer: skipped ({first_line(err)})")
            return PassResult(model, modified=False, preserved=frozenset())
        record = {"model_type": model_type, **record}
        if not record["fused"]:
            ctx.records["transformer_fusion"] = {**record, "applied": False, "why": "nothing matched"}
            return PassResult(model, modified=False, preserved=frozenset())
        verdict = _timed(model, fused, ctx) if cfg.keep == "auto" else None
        if verdict is not None:
            record["speedup"] = verdict
            if any(r < 0.98 for r in verdict.values()):
                ctx.records["transformer_fusion"] = {**record, "applied": False,
                                                     "why": "the fused graph measured slower on this machine"}
                ctx.progress("fuse-transformer: fused graph measured slower; kept the graph as it was")
                return PassResult(model, modified=False, preserved=frozenset())
        ctx.records["transformer_fusion"] = {**record, "applied": True}
        ctx.progress(f"fuse-transformer: {', '.join(f'{v} {k}' for k, v in record['fused'].items())}")
        return PassResult(fused, modified=True, preserved=frozenset())


def _timing_batches(model: Model) -> tuple[int, ...]:
    """Batches whole graphs are timed at: 1 and 8, but only 1 for a language model, whose calibration samples are
    whole windows (8 windows of 128 tokens through a 355 M GPT-2 took seconds a call, and it serves one sequence
    at a time)."""
    from bitpass.frontend.decoder import lm_spec

    try:
        return (1,) if lm_spec(model) is not None else (1, 8)
    except Exception:  # noqa: BLE001 - a damaged decoder record: time it as any model
        return (1, 8)


def _timed(model: Model, fused: Model, ctx: PassContext) -> dict[str, float] | None:
    """Batch -> unfused seconds / fused seconds on the target (None when it cannot time whole models)."""
    probe = (ctx.target.options or {}).get("latency_probe")
    if not hasattr(probe, "graphs") or ctx.calibration is None:
        return None
    batches = (ctx.calibration.fixed_batch,) if ctx.calibration.fixed_batch else _timing_batches(model)
    feeds = {b: ctx.calibration.batch_of(b) for b in batches}
    with tempfile.TemporaryDirectory(prefix="bitpass-transformer-") as tmp:
        # files, one written at a time, not both models' bytes held while the timing process runs
        paths = {"unfused": Path(tmp) / "unfused.onnx", "fused": Path(tmp) / "fused.onnx"}
        model.save_external(paths["unfused"])  # weights streamed tensor by tensor: no serialized copy held
        fused.save_external(paths["fused"])
        # cached where the probe can: the same two graphs on this CPU get the same verdict next compile (a fresh
        # timing near the threshold flipped it, and with it every later pass and the artifact's bytes)
        timed = probe.graphs(paths, feeds, cached=True)
    ratios = {b: timed.ratio("fused", "unfused", b) for b in batches}
    if any(r is None for r in ratios.values()):
        return None
    return {str(b): round(float(r), 3) for b, r in ratios.items() if r is not None}


__all__ = ["FuseTransformer", "FuseTransformerConfig", "fuse_transformer", "looks_like_transformer"]
