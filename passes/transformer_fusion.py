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
their ids; SkipLayerNormalization and the Gelu fusions take only non-layer nodes), and the
``optimize`` pipeline (fp32) turns them on; the record lists the layers a fusion took
(``swallowed_layers``), and the fused node carries the first of their ids.

``fuse_transformer`` is the library core; ``FuseTransformer`` (``fuse-transformer``) the thin pass.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from bitpass.frontend import Model, Provenance, annotation
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
                     embed_layer_norm: bool = False, num_heads: int = 0,
                     hidden_size: int = 0) -> tuple[Model, dict[str, Any]]:
    """The model with ORT's transformer fusions applied (``model`` is untouched), and what was fused."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_attention = attention
    options.enable_embed_layer_norm = embed_layer_norm
    before = {layer.id for layer in model.layers()}
    with tempfile.TemporaryDirectory(prefix="bitpass-transformer-") as tmp, quiet():
        path = Path(tmp) / "model.onnx"
        model.save(path)
        optimized = optimize_model(str(path), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                   optimization_options=options, opt_level=0)
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
        proto: onnx.ModelProto = optimized.model
    _import_domains(proto)
    fused_model = Model(ir.serde.deserialize_model(proto),
                        Provenance(model.provenance.kind, model.provenance.name, model.provenance.sha256,
                                   list(model.provenance.notes)), model.torch_module)
    swallowed = sorted(before - {layer.id for layer in fused_model.layers()})
    if swallowed:
        _mark_fused_nodes(model, fused_model, swallowed)
    return fused_model, {"fused": stats, "swallowed_layers": swallowed}


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
    #: heads and hidden size (0: the optimizer detects them from the graph)
    num_heads: int = 0
    hidden_size: int = 0
    #: auto: when the target times whole models, keep the fused graph only if it is not slower than the
    #: unfused one; always: keep it untimed
    keep: Literal["auto", "always"] = "auto"


class FuseTransformer(Pass):
    """ONNX Runtime's transformer fusions (SkipLayerNorm, BiasGelu/FastGelu; Attention, EmbedLayerNorm on request)."""

    name = "fuse-transformer"
    Config = FuseTransformerConfig
    in_place = False
    config: FuseTransformerConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
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
                                             embed_layer_norm=cfg.embed_layer_norm, num_heads=cfg.num_heads,
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


def _timed(model: Model, fused: Model, ctx: PassContext) -> dict[str, float] | None:
    """Batch -> unfused seconds / fused seconds on the target (None when it cannot time whole models)."""
    probe = (ctx.target.options or {}).get("latency_probe")
    if not hasattr(probe, "graphs") or ctx.calibration is None:
        return None
    batches = (ctx.calibration.fixed_batch,) if ctx.calibration.fixed_batch else (1, 8)
    feeds = {b: ctx.calibration.batch_of(b) for b in batches}
    timed = probe.graphs({"unfused": model.to_bytes(), "fused": fused.to_bytes()}, feeds)
    ratios = {b: timed.ratio("fused", "unfused", b) for b in batches}
    if any(r is None for r in ratios.values()):
        return None
    return {str(b): round(float(r), 3) for b, r in ratios.items() if r is not None}


__all__ = ["FuseTransformer", "FuseTransformerConfig", "fuse_transformer", "looks_like_transformer"]
