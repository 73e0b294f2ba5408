"""Weight-only low-bit quantization of a whole ONNX model: the library core the ``quantize-weights`` pass wraps.

``quantize_weights(model, calibration, recipe)`` rounds every linear layer of ``model`` (MatMul / Gemm with a
constant weight) group-wise by the recipe and writes it as ONNX Runtime ``MatMulNBits`` in place of the layer,
so the weights stay 2/4/8-bit in memory and run on ORT's low-bit kernels (a compute format, not ``packed``):

* ``method="gptq"`` (default): error-compensating rounding against each layer's own Hessian ``X^T X / n``
  from calibration inputs (``hessians.py``: one ONNX Runtime pass over the calibration set); ``"rtn"``:
  round-to-nearest (no data needed);
* ``bits`` 2, 4 or 8, or a fractional average (3.5): widths per K-slice of groups chosen by salience under one
  model-wide budget (``allocation="group"``, SliM-LLM style), one width per layer (``"layer"``), or in two levels
  (``"two-level"``, ``mixed.choose_mixtures``): inside each layer its most salient slices widened from the two
  widths around the average (2/4 for 3 bits, 4/8 for 6), each layer rounded with GPTQ at ``steps + 1`` such
  mixtures, one knapsack across layers picking a mixture per layer under the bytes budget, by each mixture's
  layer-local error or (``score="output-kl"``) the model's output KL with only that layer rounded; slice, layer
  and mixture errors are measured one layer at a time, so only one fp32 weight is unpacked at once;
* ``lorc_rank``: an activation-aware low-rank correction of each layer's rounding error (ZeroQuant-V2's LoRC);
* ``embeddings`` 4 or 8: embedding tables (``Gather``) as ``GatherBlockQuantized`` (round-to-nearest);
* ``grid`` ``fp4``, ``nf4`` or ``fp8``: codebook formats instead of integer grids (``codebooks.py``; one width,
  4 or 8 bits): no CPU kernel computes with them, so the layer is a MatMul of a weight rebuilt at session start
  (a storage format, fp32 compute).

Layers annotated ``bits.weight=32`` stay fp32 (``set-bits``, or the quality gate's repair); layers annotated
2/4/8 take that width. The result of each layer is memoized on the ``Quantizer`` by its weight, Hessian and
recipe, so rebuilding with some layers back in fp32 costs no second GPTQ run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from bitpass.frontend import Dataset, Model, Provenance, annotation
from bitpass.frontend.errors import UsageError
from bitpass.frontend.layers import Layer
from bitpass.frontend.model import drop_pages_of
from bitpass.passes.executors import SERIAL, Executor
from bitpass.passes.weight_only.apply import QuantizedLayer
from bitpass.passes.weight_only.emit import (embedding_table, input_features, linear_weight, replace_embedding,
                                             replace_linear)
from bitpass.passes.weight_only.codebooks import BITS as CODEBOOK_BITS
from bitpass.passes.weight_only.codebooks import CodebookQuantized, codebook_gptq, codebook_rtn
from bitpass.passes.weight_only.gptq import gptq
from bitpass.passes.weight_only.grid import GroupQuantized, output_error, rtn
from bitpass.passes.weight_only.hessians import Renamed, SpilledArrays, iter_layer_input_hessians
from bitpass.passes.weight_only.lowrank import low_rank_compensation
from bitpass.passes.weight_only.matmulnbits import MATMULNBITS_BITS
from bitpass.passes.weight_only.mixed import Mixture, allocate_widths, choose_mixtures, layer_mixtures, mixtures_of, \
    slice_errors

#: the ``format.weight`` annotation of a MatMulNBits layer (as ``materialize`` stamps it)
MATMULNBITS_FORMAT = "matmulnbits"
#: how a fractional average is spread (``Recipe.allocation``)
ALLOCATIONS = ("group", "layer", "two-level")
#: what the two-level knapsack sums (``Recipe.score``)
SCORES = ("error", "output-kl")


@dataclass(frozen=True)
class Recipe:
    """How ``quantize_weights`` rounds a model (the ``quantize-weights`` pass's options)."""

    method: str = "gptq"
    bits: float = 4.0
    group_size: int = 32
    act_order: bool = False
    lorc_rank: int = 0
    widths: tuple[int, ...] = (2, 4, 8)
    allocation: str = "group"
    embeddings: int = 32
    embedding_block: int = 32
    samples: int | None = 128
    accuracy_level: int = 4
    damp: float = 0.01
    #: "int" (MatMulNBits grids) or a codebook format: fp4, nf4 (4 bits), fp8 (8 bits)
    grid: str = "int"
    #: allocation="two-level": mixtures per layer from all-narrow to all-wide (steps + 1 GPTQ runs per layer)
    steps: int = 2
    #: allocation="two-level": what the knapsack across layers sums, "output-kl" (the model's output KL on
    #: calibration samples with only that layer rounded) or "error" (each layer's own tr(E^T H E))
    score: str = "output-kl"
    #: score="output-kl": calibration samples the output KL runs on
    score_samples: int = 16

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise UsageError(f"quantize-weights: unknown method {self.method!r}: use gptq or rtn")
        if self.grid != "int":
            if self.grid not in CODEBOOK_BITS:
                raise UsageError(f"quantize-weights: grid={self.grid!r}: use int, {', '.join(CODEBOOK_BITS)}")
            if float(self.bits) != CODEBOOK_BITS[self.grid] or self.lorc_rank:
                raise UsageError(f"quantize-weights: grid={self.grid} stores {CODEBOOK_BITS[self.grid]}-bit codes "
                                 f"at one width without LoRC: set bits={CODEBOOK_BITS[self.grid]} (not {self.bits:g})"
                                 f"{' and lorc_rank=0' if self.lorc_rank else ''}")
        fractional = float(self.bits) != int(self.bits) or int(self.bits) not in MATMULNBITS_BITS
        if fractional and not min(self.widths) <= self.bits <= max(self.widths):
            raise UsageError(f"quantize-weights: bits={self.bits:g} is outside the widths {list(self.widths)}: an "
                             f"average must lie between the narrowest and the widest")
        if any(w not in MATMULNBITS_BITS for w in self.widths):
            raise UsageError(f"quantize-weights: widths {list(self.widths)}: ONNX Runtime's MatMulNBits runs "
                             f"{', '.join(map(str, MATMULNBITS_BITS))} bits")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"quantize-weights: allocation={self.allocation!r}: use {', '.join(ALLOCATIONS)}")
        if self.allocation == "two-level" and fractional:
            if self.method != "gptq" or self.grid != "int":
                raise UsageError("quantize-weights: allocation=two-level rounds each layer's mixtures with GPTQ on "
                                 "integer grids: use method=gptq and grid=int (or allocation=group)")
            if self.steps < 1:
                raise UsageError(f"quantize-weights: steps={self.steps}: two-level needs at least 1 step per layer")
        if self.score not in SCORES:
            raise UsageError(f"quantize-weights: score={self.score!r}: use {', '.join(SCORES)}")
        if self.embeddings not in (4, 8, 32):
            raise UsageError(f"quantize-weights: embeddings={self.embeddings}: use 4, 8 or 32 (fp32)")

    @property
    def mixed(self) -> bool:
        """An average between widths (allocated per slice or per layer) rather than one width."""
        return float(self.bits) != int(self.bits) or int(self.bits) not in MATMULNBITS_BITS

    @property
    def two_widths(self) -> tuple[int, int]:
        """The narrowest and widest of ``widths`` around a fractional ``bits``: what two-level mixes."""
        return (max(w for w in self.widths if w <= self.bits), min(w for w in self.widths if w >= self.bits))

    @property
    def needs_data(self) -> bool:
        return self.method == "gptq" or self.mixed or self.lorc_rank > 0


@dataclass
class Outcome:
    """What ``quantize_weights`` did: per layer, and the layers it left alone with why."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def record(self, recipe: Recipe) -> dict[str, Any]:
        params = sum(r["params"] for r in self.layers.values() if r["kind"] == "linear")
        bits = sum(r["average_bits"] * r["params"] for r in self.layers.values() if r["kind"] == "linear")
        return {"method": recipe.method, "bits": recipe.bits, "group_size": recipe.group_size,
                "act_order": recipe.act_order, "lorc_rank": recipe.lorc_rank, "widths": list(recipe.widths),
                "allocation": recipe.allocation if recipe.mixed else None, "embeddings": recipe.embeddings,
                **({"two_level": {"widths": list(recipe.two_widths), "steps": recipe.steps, "score": recipe.score}}
                   if recipe.mixed and recipe.allocation == "two-level" else {}),
                "average_bits": bits / params if params else None, "layers": self.layers, "kept_fp32": self.skipped}


def shallow_copy(model: Model) -> Model:
    """A new ``Model`` whose graph structure is copied but whose weight tensors are shared (O(nodes), no weight
    bytes copied): a pass that swaps nodes and initializers stays functional at no memory cost."""
    source = model.ir
    graph = source.graph.clone()
    copy = ir.Model(graph, ir_version=source.ir_version, producer_name=source.producer_name,
                    producer_version=source.producer_version, domain=source.domain, model_version=source.model_version,
                    doc_string=source.doc_string, functions=list(source.functions.values()),
                    metadata_props=dict(source.metadata_props))
    return Model(copy, Provenance(model.provenance.kind, model.provenance.name, model.provenance.sha256,
                                  list(model.provenance.notes)), model.torch_module)


class Quantizer:
    """``quantize_weights`` with a memo of layer results and Hessians that outlives one call (see module doc)."""

    def __init__(self) -> None:
        self._layers: dict[tuple[Any, ...], QuantizedLayer] = {}
        self._hessians = SpilledArrays()  # {(data digest, tensor, samples): X^T X / n}, on disk between uses

    def __call__(self, model: Model, calibration: Dataset | None, recipe: Recipe, *,
                 progress: Callable[[str], None] | None = None,
                 executor: Executor = SERIAL) -> tuple[Model, Outcome]:
        """``executor`` runs the per-layer work (slice errors, rounding); the result does not depend on it."""
        say = progress or (lambda _message: None)
        result = shallow_copy(model)
        outcome = Outcome()
        linear, tables = self._select(result, recipe, outcome)
        hessians: Mapping[str, np.ndarray] = {}
        if linear and recipe.needs_data:
            if calibration is None:
                raise UsageError(f"quantize-weights(method={recipe.method}) needs calibration data for the layer "
                                 f"Hessians: give --calib (token windows for a language model), or use method=rtn")
            hessians = self._layer_hessians(model, linear, calibration, recipe, say)
        widths = self._widths(result, linear, hessians, recipe, say, executor, calibration)
        self._round_ahead(linear, hessians, widths, recipe, executor, say)
        for index, layer in enumerate(linear):
            weight = linear_weight(layer)
            assert weight is not None
            quantized = self._quantize(layer.id, weight, hessians.get(layer.id), widths[layer.id], recipe)
            created = replace_linear(result.graph, layer, quantized.quantized, lowrank=quantized.lowrank,
                                     accuracy_level=recipe.accuracy_level)
            node = _node_of(created, layer.id)
            annotation.set_weight_bits(node, int(max(quantized.quantized.bits)))
            annotation.set_activation_bits(node, annotation.FLOAT_BITS)
            annotation.set_weight_format(node, MATMULNBITS_FORMAT if recipe.grid == "int" else f"codebook-{recipe.grid}")
            outcome.layers[layer.id] = {
                "kind": "linear", "op": layer.op_type, "params": int(weight.size),
                "average_bits": float(np.mean(quantized.quantized.bits)),
                "widths": {str(b): int(np.sum(quantized.quantized.bits == b)) for b in sorted(set(
                    int(v) for v in quantized.quantized.bits))},
                "output_error": quantized.output_error if layer.id in hessians else None,
                "bytes": int(quantized.nbytes())}
            del weight
            if (index + 1) % 16 == 0:
                drop_pages_of(model)  # paged-out weights rounded so far are read: their file pages need not stay
                say(f"quantize-weights: {index + 1}/{len(linear)} layers")
        drop_pages_of(model)
        for layer, bits in tables:
            created, _ = replace_embedding(result.graph, layer, bits, recipe.embedding_block)
            node = _node_of(created, layer.id)
            annotation.set_weight_bits(node, bits)
            annotation.set_activation_bits(node, annotation.FLOAT_BITS)
            annotation.set_weight_format(node, "gather-block-quantized")
            outcome.layers[layer.id] = {"kind": "embedding", "op": "Gather", "params": int(layer.params),
                                        "average_bits": float(bits), "block": recipe.embedding_block}
        return result, outcome

    # --- steps -------------------------------------------------------------------------------------
    @staticmethod
    def _select(model: Model, recipe: Recipe, outcome: Outcome) -> tuple[list[Layer], list[tuple[Layer, int]]]:
        """Linear layers to round and embedding tables to quantize; the rest recorded with the reason."""
        linear: list[Layer] = []
        tables: list[tuple[Layer, int]] = []
        for layer in model.layers():
            wanted = annotation.weight_bits(layer.node)
            if wanted == annotation.FLOAT_BITS:
                outcome.skipped[layer.id] = "annotated fp32 (bits.weight=32)"
                continue
            if layer.op_type == "Gather":
                bits = wanted if wanted in (4, 8) else recipe.embeddings
                table = embedding_table(layer)
                if bits == annotation.FLOAT_BITS:
                    outcome.skipped[layer.id] = "embedding table (quantize-weights(embeddings=4|8) quantizes it)"
                elif table is None or table.shape[1] % recipe.embedding_block:
                    outcome.skipped[layer.id] = (f"not a 2-D table blocked by {recipe.embedding_block}"
                                                 if table is not None else "not an embedding lookup on axis 0")
                else:
                    tables.append((layer, bits))
                continue
            features = input_features(layer)
            if features is None:
                outcome.skipped[layer.id] = f"{layer.op_type} is not a linear layer MatMulNBits can replace"
            elif features % recipe.group_size:
                outcome.skipped[layer.id] = (f"its {features} input features are not a multiple of the group "
                                             f"size {recipe.group_size}")
            elif wanted is not None and wanted not in MATMULNBITS_BITS:
                outcome.skipped[layer.id] = f"annotated {wanted} bits; MatMulNBits runs {MATMULNBITS_BITS}"
            else:
                linear.append(layer)
        return linear, tables

    def _layer_hessians(self, model: Model, layers: Sequence[Layer], data: Dataset, recipe: Recipe,
                        say: Callable[[str], None]) -> Mapping[str, np.ndarray]:
        """``{layer id: its input Hessian}``, each read from the memo when used (one layer's in memory at once)."""
        inputs = {layer.id: layer.node.inputs[0].name or "" for layer in layers}
        wanted = [t for t in dict.fromkeys(inputs.values()) if (data.sha256, t, recipe.samples) not in self._hessians]
        if wanted:
            say(f"quantize-weights: collecting the inputs of {len(layers)} layers ({len(wanted)} distinct tensors)")
            # spilled group by group as collected: at most ``MAX_GRAM_BYTES`` of them in memory at once
            for tensor, h in iter_layer_input_hessians(model, wanted, data, samples=recipe.samples, progress=say):
                self._hessians[(data.sha256, tensor, recipe.samples)] = h
                del h
        return Renamed(self._hessians, {layer_id: (data.sha256, tensor, recipe.samples)
                                        for layer_id, tensor in inputs.items()})

    @staticmethod
    def _widths(model: Model, layers: Sequence[Layer], hessians: Mapping[str, np.ndarray], recipe: Recipe,
                say: Callable[[str], None], executor: Executor = SERIAL,
                calibration: Dataset | None = None) -> dict[str, np.ndarray]:
        """Bits per K-slice of each layer: the annotated or recipe width, or a mix under the average."""
        out: dict[str, np.ndarray] = {}
        mixed = []
        for layer in layers:
            slices = int(input_features(layer) or 0) // recipe.group_size
            wanted = annotation.weight_bits(layer.node)
            if wanted in MATMULNBITS_BITS:
                out[layer.id] = np.full(slices, wanted)
            elif not recipe.mixed:
                out[layer.id] = np.full(slices, int(recipe.bits))
            else:
                mixed.append(layer)
        if not mixed:
            return out
        if recipe.allocation == "two-level":
            out.update(two_level_widths(model, mixed, hessians, recipe, say, executor, calibration))
            return out
        widths = sorted(recipe.widths)
        say(f"quantize-weights: {recipe.allocation}-wise widths from {widths} at {recipe.bits:g} average bits "
            f"over {len(mixed)} layers")
        errors, sizes, counts = [], [], []
        per_layer = _in_batches(executor, _slice_errors_task, (tuple(widths), recipe.group_size), mixed,
                                lambda layer: (linear_weight(layer), hessians[layer.id]))
        for layer, per_slice in zip(mixed, per_layer):  # only the errors are kept, not the unpacked weights
            weight = linear_weight(layer)
            assert weight is not None
            if recipe.allocation == "layer":
                errors.append(per_slice.sum(axis=0, keepdims=True))
                sizes.append(np.array([float(weight.size)]))
            else:
                errors.append(per_slice)
                sizes.append(np.full(len(per_slice), float(recipe.group_size * weight.shape[1])))
            counts.append(weight.shape[0] // recipe.group_size)
        chosen = allocate_widths(np.concatenate(errors), widths, float(recipe.bits), np.concatenate(sizes))
        start = 0
        for layer, rows, count in zip(mixed, errors, counts):
            part = chosen[start:start + len(rows)]
            start += len(rows)
            out[layer.id] = np.full(count, part[0]) if recipe.allocation == "layer" else np.asarray(part)
        return out

    def _round_ahead(self, layers: Sequence[Layer], hessians: Mapping[str, np.ndarray],
                     widths: Mapping[str, np.ndarray], recipe: Recipe, executor: Executor,
                     say: Callable[[str], None]) -> None:
        """With workers to spare, round the layers the memo lacks on them (GPTQ dominates a decoder's compile);
        the serial executor rounds each layer when it is written instead, holding one at a time."""
        if executor.workers <= 1:
            return
        keys = {layer.id: self._key(layer.id, linear_weight(layer), hessians.get(layer.id), widths[layer.id], recipe)
                for layer in layers}  # each weight unpacked and hashed once here, once more when sent
        todo = [layer for layer in layers if keys[layer.id] not in self._layers]
        if not todo:
            return
        say(f"quantize-weights: rounding {len(todo)} layers on {executor.workers} workers ({executor.spec})")
        done = _in_batches(executor, _round_task, recipe, todo,
                           lambda layer: (linear_weight(layer), hessians.get(layer.id), widths[layer.id]))
        for layer, quantized in zip(todo, done):
            self._layers[keys[layer.id]] = quantized

    @staticmethod
    def _key(layer_id: str, weight: np.ndarray | None, h: np.ndarray | None, bits: np.ndarray,
             recipe: Recipe) -> tuple[Any, ...]:
        assert weight is not None
        return (layer_id, _digest(weight), None if h is None else _digest(h), tuple(int(b) for b in bits),
                recipe.method, recipe.group_size, recipe.act_order, recipe.lorc_rank, recipe.damp, recipe.grid)

    def _quantize(self, layer_id: str, weight: np.ndarray, h: np.ndarray | None, bits: np.ndarray,
                  recipe: Recipe) -> QuantizedLayer:
        key = self._key(layer_id, weight, h, bits, recipe)
        if key not in self._layers:
            self._layers[key] = round_layer(weight, h, bits, recipe)
        return self._layers[key]


def round_layer(weight: np.ndarray, h: np.ndarray | None, bits: np.ndarray, recipe: Recipe) -> QuantizedLayer:
    """One linear layer rounded by ``recipe`` at ``bits`` per K-slice (GPTQ against ``h``, or RTN), with its
    optional low-rank compensation and output error: a pure function, so any worker may compute it."""
    quantized: GroupQuantized | CodebookQuantized
    if recipe.grid != "int":
        quantized = (codebook_gptq(weight, h, recipe.grid, recipe.group_size, damp=recipe.damp)
                     if recipe.method == "gptq" and h is not None else codebook_rtn(weight, recipe.grid,
                                                                                   recipe.group_size))
    elif recipe.method == "gptq":
        assert h is not None
        quantized = gptq(weight, h, bits, recipe.group_size, act_order=recipe.act_order, damp=recipe.damp)
    else:
        quantized = rtn(weight, bits, recipe.group_size)
    lowrank = None
    if recipe.lorc_rank:
        assert h is not None
        lowrank = low_rank_compensation(weight, quantized.dequantize(), recipe.lorc_rank, h)
    approx = quantized.dequantize() if lowrank is None else quantized.dequantize() + lowrank[0] @ lowrank[1]
    error = output_error(weight, approx, h) if h is not None else 0.0
    return QuantizedLayer(quantized, lowrank, error)


def two_level_widths(model: Model, layers: Sequence[Layer], hessians: Mapping[str, np.ndarray], recipe: Recipe,
                     say: Callable[[str], None], executor: Executor = SERIAL,
                     calibration: Dataset | None = None) -> dict[str, np.ndarray]:
    """Bits per K-slice of each layer by the two levels (see the module doc): the mixtures of a few layers at a
    time are rounded (on the executor's workers), scored, and kept without their codes; one knapsack picks."""
    low, high = recipe.two_widths
    say(f"quantize-weights: two-level widths, {low}/{high}-bit mixtures in {recipe.steps} steps per layer, at "
        f"{recipe.bits:g} average bits over {len(layers)} layers (scored by {recipe.score})")
    scorer = None
    if recipe.score == "output-kl":
        from bitpass.passes.weight_only.scores import OutputKL

        assert calibration is not None
        scorer = OutputKL(model, list(layers), calibration, samples=recipe.score_samples)
    shared = (low, high, recipe.steps, recipe.group_size, recipe.act_order, recipe.damp)
    options: dict[str, list[Mixture]] = {}
    step = max(1, 2 * executor.workers)
    for start in range(0, len(layers), step):
        batch = layers[start:start + step]
        done = executor.map(_mixtures_task, shared, [(linear_weight(layer), hessians[layer.id]) for layer in batch])
        for layer, mixtures in zip(batch, done):
            summary = mixtures_of(mixtures)
            if scorer is not None:
                summary = [Mixture(m.widths, m.nbytes, scorer(layer, q.dequantize()))
                           for m, (_, q, _) in zip(summary, mixtures)]
            options[layer.id] = summary
    del scorer  # its session held a second copy of the weights
    sizes = {layer.id: int(layer.params) for layer in layers}
    chosen = choose_mixtures(options, sizes, float(recipe.bits), low, high, cost="bytes")
    return {layer_id: options[layer_id][index].widths for layer_id, index in chosen.items()}


def _mixtures_task(shared: tuple[int, int, int, int, bool, float],
                   item: tuple[np.ndarray, np.ndarray]) -> list[tuple[float, GroupQuantized, float]]:
    low, high, steps, group_size, act_order, damp = shared
    weight, h = item
    return layer_mixtures(weight, h, low, high, steps, group_size, act_order=act_order, damp=damp)


def _round_task(recipe: Recipe, item: tuple[np.ndarray, np.ndarray | None, np.ndarray]) -> QuantizedLayer:
    weight, h, bits = item
    return round_layer(weight, h, bits, recipe)


def _slice_errors_task(shared: tuple[tuple[int, ...], int], item: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    widths, group_size = shared
    weight, h = item
    return slice_errors(weight, h, widths, group_size)


def _in_batches(executor: Executor, fn: Callable[[Any, Any], Any], shared: Any, layers: Sequence[Layer],
                item: Callable[[Layer], Any]) -> list[Any]:
    """``executor.map`` over ``layers`` a few at a time, so only that many unpacked weights are held at once."""
    out: list[Any] = []
    step = max(1, 2 * executor.workers)
    for start in range(0, len(layers), step):
        out += executor.map(fn, shared, [item(layer) for layer in layers[start:start + step]])
    return out


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1)).hexdigest()


def _node_of(nodes: Sequence[ir.Node], layer_id: str) -> ir.Node:
    for node in nodes:
        if annotation.layer_id(node) == layer_id:
            return node
    raise AssertionError(f"layer {layer_id!r} vanished while it was written")


def quantize_weights(model: Model, calibration: Dataset | None, recipe: Recipe | None = None, *,
                     progress: Callable[[str], None] | None = None,
                     executor: Executor = SERIAL) -> tuple[Model, dict[str, Any]]:
    """A new ``Model`` with every linear layer of ``model`` written as MatMulNBits by ``recipe`` (see the module
    doc); ``model`` is untouched (its weights are shared, not copied). Returns the model and a record."""
    recipe = recipe or Recipe()
    result, outcome = Quantizer()(model, calibration, recipe, progress=progress, executor=executor)
    return result, outcome.record(recipe)
