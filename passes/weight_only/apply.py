"""Quantize a model's linear layers with one weight-only recipe and materialize the result (torch or ONNX).

The recipe is the public entry point the pipeline's weight-only pass wraps: ``WeightOnlyRecipe`` says how
each layer is rounded (RTN or GPTQ), at what width (one width, or an average over group-wise mixed
widths), with what group size, and whether a low-rank correction is added. Layers are independent
(layer-local objectives), so this runs one layer at a time with bounded memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitpass.passes.weight_only.codebooks import BITS as CODEBOOK_BITS
from bitpass.passes.weight_only.codebooks import FORMATS as CODEBOOK_FORMATS
from bitpass.passes.weight_only.codebooks import CodebookQuantized, codebook_gptq, codebook_rtn
from bitpass.passes.weight_only.gptq import gptq
from bitpass.passes.weight_only.grid import GroupQuantized, output_error, quadratic_form, rtn
from bitpass.passes.weight_only.lowrank import low_rank_compensation
from bitpass.passes.weight_only.mixed import (allocate_widths, global_slice_widths, hierarchical_widths,
                                              mixed_quantize)


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """How to round every layer: ``bits`` is one width, or with ``widths`` an average (e.g. 3.5) over
    group-wise mixed widths chosen per K-slice by salience."""

    method: str = "gptq"  # "gptq" or "rtn"
    bits: float = 4
    group_size: int = 32
    widths: tuple[int, ...] | None = None  # group-wise mixed widths (SliM-LLM style) when given
    act_order: bool = False
    lowrank: int = 0  # rank of an activation-aware LoRC correction; 0 = none
    #: "int" (MatMulNBits' affine integer grids) or a codebook format of ``codebooks.py``: fp4, nf4, fp8
    grid: str = "int"

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"unknown rounding method {self.method!r}: use 'gptq' or 'rtn'")
        if self.grid != "int" and (self.grid not in CODEBOOK_FORMATS or self.widths is not None
                                   or self.bits != CODEBOOK_BITS[self.grid]):
            raise ValueError(f"grid {self.grid!r}: use int, or one of {', '.join(CODEBOOK_FORMATS)} at its own "
                             f"width ({CODEBOOK_BITS}) without mixed widths")
        if self.widths is None and float(self.bits) != int(self.bits):
            raise ValueError(f"{self.bits} bits is fractional: give widths to mix (e.g. widths=(2, 4, 8))")


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer's result: codes and grids, an optional low-rank correction, and its layer-local error."""

    quantized: GroupQuantized | CodebookQuantized
    lowrank: tuple[np.ndarray, np.ndarray] | None
    output_error: float

    def dequantize(self) -> np.ndarray:
        weight = self.quantized.dequantize()
        return weight if self.lowrank is None else weight + self.lowrank[0] @ self.lowrank[1]

    def nbytes(self) -> int:
        extra = 0 if self.lowrank is None else sum(f.nbytes for f in self.lowrank)
        return self.quantized.nbytes() + extra


def quantize_layer(weight: np.ndarray, h: np.ndarray, recipe: WeightOnlyRecipe) -> QuantizedLayer:
    """Round one ``(K, N)`` weight by ``recipe`` against its layer Hessian ``h``."""
    quantized: GroupQuantized | CodebookQuantized
    if recipe.grid != "int":
        quantized = (codebook_gptq(weight, h, recipe.grid, recipe.group_size) if recipe.method == "gptq"
                     else codebook_rtn(weight, recipe.grid, recipe.group_size))
    elif recipe.widths is not None:
        quantized = mixed_quantize(weight, h, float(recipe.bits), widths=recipe.widths, group_size=recipe.group_size,
                                   method=recipe.method, act_order=recipe.act_order)
    elif recipe.method == "gptq":
        quantized = gptq(weight, h, int(recipe.bits), recipe.group_size, act_order=recipe.act_order)
    else:
        quantized = rtn(weight, int(recipe.bits), recipe.group_size)
    lowrank = None
    if recipe.lowrank:
        lowrank = low_rank_compensation(weight, quantized.dequantize(), recipe.lowrank, h)
    layer = QuantizedLayer(quantized, lowrank, 0.0)
    return QuantizedLayer(quantized, lowrank, output_error(weight, layer.dequantize(), h))


def quantize_layers(weights: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray],
                    recipe: WeightOnlyRecipe | Mapping[str, WeightOnlyRecipe]) -> dict[str, QuantizedLayer]:
    """Every layer of ``weights`` by one recipe, or each by its own (a per-layer plan)."""
    return {layer_id: quantize_layer(weight, hessians[layer_id],
                                     recipe[layer_id] if isinstance(recipe, Mapping) else recipe)
            for layer_id, weight in weights.items()}


def layerwise_widths(weights: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray],
                     widths: Sequence[int], average_bits: float, group_size: int = 32) -> dict[str, int]:
    """One width per *layer* at a parameter-weighted average (Layer-Wise Quantization's fractional budget):
    each layer's absolute output error ``tr(E^T H E)`` under RTN at each width, one knapsack over layers.
    The per-layer baseline that group-wise mixed widths are compared with."""
    ids = list(weights)
    errors = np.array([[output_error(weights[i], rtn(weights[i], b, group_size).dequantize(), hessians[i])
                        * quadratic_form(weights[i], hessians[i]) for b in widths]
                       for i in ids])
    sizes = np.array([weights[i].size for i in ids], np.float64)
    chosen = allocate_widths(errors, widths, average_bits, sizes)
    return {layer_id: int(bits) for layer_id, bits in zip(ids, chosen)}


def quantize_groupwise(weights: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray], average_bits: float, *,
                       widths: Sequence[int] = (2, 4, 8), group_size: int = 32, method: str = "gptq",
                       act_order: bool = False, proxy: str = "rtn") -> dict[str, QuantizedLayer]:
    """Group-wise mixed widths under one model-wide average (``global_slice_widths``), then each layer
    rounded at its slices' widths."""
    chosen = global_slice_widths(weights, hessians, widths, average_bits, group_size, proxy=proxy)
    out = {}
    for layer_id, weight in weights.items():
        h = hessians[layer_id]
        if method == "gptq":
            quantized = gptq(weight, h, chosen[layer_id], group_size, act_order=act_order)
        else:
            quantized = rtn(weight, chosen[layer_id], group_size)
        out[layer_id] = QuantizedLayer(quantized, None, output_error(weight, quantized.dequantize(), h))
    return out


def quantize_hierarchical(weights: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray], average_bits: float,
                          *, low: int = 3, high: int = 4, steps: int = 4, group_size: int = 32,
                          proxy: str = "gptq", score: Any = None, cost: str = "bytes") -> dict[str, QuantizedLayer]:
    """Two-level group-wise widths (``hierarchical_widths``): salient slices widened inside each layer, the
    layers' mixtures chosen under one model-wide average by their measured GPTQ output errors (or ``score``)."""
    chosen = hierarchical_widths(weights, hessians, average_bits, low, high, steps=steps, group_size=group_size,
                                 proxy=proxy, score=score, cost=cost)
    return {i: QuantizedLayer(q, None, output_error(weights[i], q.dequantize(), hessians[i])) for i, q in chosen.items()}


def apply_to_torch(lm: Any, layers: Mapping[str, QuantizedLayer]) -> None:
    """Write each layer's dequantized weight into the torch LM (in place; untie a shared lm_head first)."""
    from bitpass.passes.weight_only.calibration import set_weight_matrix, untie_output_embedding

    untie_output_embedding(lm)
    for layer_id, layer in layers.items():
        set_weight_matrix(lm.get_submodule(layer_id), layer.dequantize())


def apply_to_onnx(proto: Any, layers: Mapping[str, QuantizedLayer], *, accuracy_level: int = 4) -> None:
    """Replace each layer's MatMul in the ONNX graph by MatMulNBits (in place); widths must be 2, 4 or 8."""
    from bitpass.passes.weight_only.matmulnbits import replace_matmul

    for layer_id, layer in layers.items():
        replace_matmul(proto, layer_id, layer.quantized, accuracy_level=accuracy_level, lowrank=layer.lowrank)
