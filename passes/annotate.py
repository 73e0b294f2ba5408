"""``set-bits``: write weight/activation bit widths onto named quantizable layers."""

from __future__ import annotations

from typing import Literal

import pydantic

from bitpass.frontend import Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.passes.analyses import BITS_ANNOTATIONS
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult


def _layer_list(value: str | int | list[str | int]) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


class SetBits(Pass):
    """Annotate named layers (or ``*``) with weight/activation bits; 32 keeps a layer in fp32."""

    name = "set-bits"

    class Config(PassConfig):
        #: comma-separated layer ids (``"a,b"``), a list, or ``*`` for every quantizable layer
        layers: str | int | list[str | int] = "*"
        weight: Literal[2, 4, 8, 32] | None = 8
        activation: Literal[8, 32] | None = None
        #: how to materialize the weight: qdq, matmulnbits, blocked-dq, or packed (stored low-bit, fp32 speed)
        format: Literal["qdq", "matmulnbits", "blocked-dq", "packed"] | None = None

        @pydantic.model_validator(mode="after")
        def _something_to_set(self) -> SetBits.Config:
            if self.weight is None and self.activation is None:
                raise ValueError("give weight=, activation= or both")
            if not _layer_list(self.layers):
                raise ValueError("layers is empty: give layer ids or '*'")
            return self

    produces = frozenset({BITS_ANNOTATIONS})
    in_place = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        layers = model.layers()
        wanted = _layer_list(cfg.layers)
        if wanted == ["*"]:
            chosen = layers
        else:
            by_id = {layer.id: layer for layer in layers}
            unknown = [w for w in wanted if w not in by_id]
            if unknown:
                valid = ", ".join(layer.id for layer in layers) or "none"
                raise UsageError(f"set-bits: no quantizable layer {', '.join(map(repr, unknown))}; "
                                 f"valid layer ids: {valid}")
            chosen = [by_id[w] for w in dict.fromkeys(wanted)]
        for layer in chosen:
            if cfg.weight is not None:
                annotation.set_weight_bits(layer.node, cfg.weight)
            if cfg.activation is not None:
                annotation.set_activation_bits(layer.node, cfg.activation)
            if cfg.format is not None:
                annotation.set_weight_format(layer.node, cfg.format)
        done = ctx.records.setdefault("set_bits", {})
        for layer in chosen:
            done[layer.id] = {"weight": annotation.weight_bits(layer.node),
                              "activation": annotation.activation_bits(layer.node)}
        # only node metadata changed: every analysis of the graph (e.g. activation ranges) still holds
        return PassResult(model, modified=bool(chosen), preserved=PRESERVE_ALL)
