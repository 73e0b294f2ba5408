"""``quantize-weights``: weight-only low-bit linear layers as MatMulNBits (GPTQ or RTN, group-wise, fractional
averages by salience-driven mixed widths), the pass over ``bitpass.passes.weight_only.quantize``."""

from __future__ import annotations

from typing import Literal

import pydantic

from bitpass.frontend import Model
from bitpass.passes.analyses import QUANTIZED
from bitpass.passes.infra import Pass, PassConfig, PassContext, PassResult
from bitpass.passes.weight_only.codebooks import BITS as CODEBOOK_BITS
from bitpass.passes.weight_only.quantize import Quantizer, Recipe


class QuantizeWeights(Pass):
    """Weight-only 2/4/8-bit linear layers as ONNX Runtime MatMulNBits (weights stay low-bit in memory); GPTQ
    against each layer's own calibration Hessian, or round-to-nearest; a fractional ``bits`` (3.5) mixes widths
    per group by salience under one model-wide average. The decoder language model pipeline's quantizer."""

    name = "quantize-weights"

    class Config(PassConfig):
        #: gptq (error-compensating rounding against each layer's input Hessian; needs --calib) or rtn
        method: Literal["gptq", "rtn"] = "gptq"
        #: 2, 4 or 8; or an average between the widths (3.5): mixed widths chosen by salience
        bits: float = pydantic.Field(4.0, ge=2, le=8)
        #: input features per scale and zero point (MatMulNBits block size)
        group_size: Literal[16, 32, 64, 128, 256] = 32
        #: round input features in order of decreasing Hessian diagonal (grids stay the contiguous groups')
        act_order: bool = False
        #: rank of an activation-aware low-rank correction of each layer's rounding error (0: none)
        lorc_rank: int = pydantic.Field(0, ge=0, le=256)
        #: the widths a fractional average mixes
        widths: list[Literal[2, 4, 8]] = [2, 4, 8]
        #: how a fractional average is spread. two-level (default with method=gptq, grid=int): each layer's most
        #: salient groups widened (the two widths around bits: 2/4 or 4/8), one mixture per layer chosen under the
        #: model-wide bytes budget; group: widths per group under one model-wide budget (the default otherwise);
        #: layer: one width per layer. Real-weight byte LM, held-out bits/byte at equal bytes: two-level +0.85 %
        #: at 3 bits (group +1.56 %, layer +1.45 %), KL 0.00050 at 6 bits (group 0.00304, layer 0.00077)
        allocation: Literal["group", "layer", "two-level"] = "two-level"
        #: two-level: mixtures per layer, from all-narrow to all-wide in this many steps (a GPTQ run each)
        steps: int = pydantic.Field(2, ge=1, le=16)
        #: two-level: what the budget trades, output-kl (the model's output KL on score_samples calibration
        #: samples with only that layer rounded: an ORT run per mixture) or error (each layer's own output error:
        #: cheaper, but it lost to group and layer at 3 bits, +1.88 %)
        score: Literal["error", "output-kl"] = "output-kl"
        #: two-level with score=output-kl: calibration samples the output KL runs on
        score_samples: int = pydantic.Field(16, ge=1)
        #: int: MatMulNBits integer grids (low-bit compute); fp4 (E2M1), nf4 (NormalFloat) or fp8 (E4M3):
        #: codebook storage widened to fp32 at session start (bits is then the format's: 4, or 8 for fp8)
        grid: Literal["int", "fp4", "nf4", "fp8"] = "int"
        #: embedding tables (Gather) as GatherBlockQuantized at 4 or 8 bits, or left fp32 (32)
        embeddings: Literal[4, 8, 32] = 32
        #: calibration samples the Hessians are taken over (the first ones)
        samples: int = pydantic.Field(128, ge=1)
        #: MatMulNBits accuracy_level: 4 computes in int8 (fast at decode and prefill on CPUs)
        accuracy_level: int = pydantic.Field(4, ge=0, le=4)

    produces = frozenset({QUANTIZED})
    in_place = False
    config: Config

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._quantizer = Quantizer()  # memo across reruns (the quality gate's repair rebuilds from here)

    def recipe(self) -> Recipe:
        cfg = self.config
        bits = float(CODEBOOK_BITS[cfg.grid]) if cfg.grid in CODEBOOK_BITS and "bits" not in cfg.model_fields_set \
            else cfg.bits
        allocation = cfg.allocation
        if "allocation" not in cfg.model_fields_set and (cfg.method != "gptq" or cfg.grid != "int"):
            allocation = "group"  # two-level rounds its mixtures with GPTQ on integer grids
        return Recipe(method=cfg.method, bits=bits, grid=cfg.grid, group_size=cfg.group_size, act_order=cfg.act_order,
                      lorc_rank=cfg.lorc_rank, widths=tuple(sorted(set(cfg.widths))), allocation=allocation,
                      embeddings=cfg.embeddings, embedding_block=cfg.group_size, samples=cfg.samples,
                      accuracy_level=cfg.accuracy_level, steps=cfg.steps, score=cfg.score,
                      score_samples=cfg.score_samples)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        recipe = self.recipe()
        result, outcome = self._quantizer(model, ctx.calibration, recipe, progress=ctx.progress,
                                          executor=ctx.executor)
        record = outcome.record(recipe)
        record["weight_bytes"] = {"before": model.weight_bytes(), "after": result.weight_bytes()}
        ctx.records["weight_only"] = record
        ctx.analyses.put(QUANTIZED, record)
        return PassResult(result, modified=True, preserved=frozenset({QUANTIZED}))


__all__ = ["QuantizeWeights"]
