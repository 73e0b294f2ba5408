"""``raise-opset``: give the model the opset its chosen formats need, as a recorded step, not a late failure.

Some formats exist only from an opset on: blocked ``DequantizeLinear`` (4-bit Conv weights, ``block_size``)
and INT4/UINT4 Q/DQ from opset 21, INT2 from 25. A model exported at opset 17 or 20 used to fail at the very
end of a compile ("blocked int4 DequantizeLinear needs opset 21"), after minutes of sensitivity and timing.
``required_opset`` reads what a plan needs from ``materialize.decide``'s decisions; ``raise_opset`` converts
the model with ONNX's version converter, run on the graph without its weights (they are re-attached by
name, so a large model is not copied) and with every node's annotations carried over by name.

``materialize`` raises the opset itself when a plan needs it (and notes it in the provenance); the pass
makes the step explicit and early, right after bit allocation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import onnx
import onnx.version_converter
import onnx_ir as ir

from bitpass.frontend import Model
from bitpass.frontend.errors import BitpassError
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult
from bitpass.passes.structure import skeleton

#: (result, weight bits) -> the opset it needs, and why; ``None`` bits: any width
FORMAT_OPSETS: dict[tuple[str, int | None], tuple[int, str]] = {
    ("blocked-dq", 4): (21, "blocked int4 DequantizeLinear"),
    ("blocked-dq", 8): (21, "blocked int8 DequantizeLinear (block_size)"),
    ("blocked-dq", 2): (25, "blocked int2 DequantizeLinear"),
    ("int8-qdq", None): (13, "per-channel QuantizeLinear/DequantizeLinear (axis)"),
}


def required_opset(decisions: Iterable[object]) -> tuple[int, str]:
    """The opset a list of ``materialize.Decision`` needs (0 when none needs one), and what needs it."""
    need, why = 0, ""
    for decision in decisions:
        result, bits = getattr(decision, "result", ""), getattr(decision, "weight_bits", None)
        found = FORMAT_OPSETS.get((result, bits)) or FORMAT_OPSETS.get((result, None))
        if found is not None and found[0] > need:
            need, why = found[0], f"{found[1]} (layer {getattr(decision, 'layer_id', '?')})"
    return need, why


def raise_opset(model: Model, opset: int) -> bool:
    """Convert ``model`` in place to default-domain ``opset`` when it is below; True when it changed.

    Raises ``BitpassError`` naming the operator when ONNX's converter cannot do it."""
    current = model.opset
    if current >= opset:
        return False
    proto, detached = skeleton(model.ir)
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
    except Exception as err:  # the converter raises RuntimeError / ConvertError with a C++ message
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BitpassError(f"cannot raise the model's opset from {current} to {opset} (ONNX's version converter: "
                           f"{text}); export the model at opset {opset} or later") from err
    new = ir.serde.deserialize_model(converted)
    for name, value in new.graph.initializers.items():
        original = detached.get(name)
        if original is not None and value.const_value is not None \
                and tuple(value.const_value.shape) == tuple(original.shape):
            value.const_value = original
    metadata = {node.name: dict(node.metadata_props) for node in model.ir.graph.all_nodes() if node.name}
    for node in new.graph.all_nodes():
        for key, text in metadata.get(node.name or "", {}).items():
            node.metadata_props.setdefault(key, text)
    new.metadata_props.update(model.ir.metadata_props)
    for key, function in model.ir.functions.items():
        new.functions.setdefault(key, function)
    model.ir = new
    return True


class RaiseOpsetConfig(PassConfig):
    #: auto: the opset the layers' planned formats need (bits/format annotations), else that opset
    opset: int | Literal["auto"] = "auto"


class RaiseOpset(Pass):
    """Raise the model's opset to what its planned formats need (blocked int4 DQ: 21), recorded, before quantizing."""

    name = "raise-opset"
    Config = RaiseOpsetConfig
    config: RaiseOpsetConfig

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from bitpass.passes.materialize import decide

        capabilities = (ctx.target.options or {}).get("capabilities")
        if getattr(capabilities, "lowers_bits", False):
            ctx.records["opset"] = {"opset": model.opset, "why": f"left to the {ctx.target.backend} backend"}
            return PassResult(model, modified=False, preserved=PRESERVE_ALL)
        if self.config.opset == "auto":
            target, why = required_opset(decide(model))
        else:
            target, why = int(self.config.opset), "asked for"
        before = model.opset
        changed = raise_opset(model, target) if target else False
        ctx.records["opset"] = {"from": before, "to": model.opset, "why": why if changed else
                                f"opset {before} already serves the plan" + (f" ({why})" if why else "")}
        if changed:
            ctx.progress(f"raise-opset: {before} -> {model.opset} for {why}")
        # the computation, node and tensor names stay: calibrated ranges, sensitivities and timings still hold
        # (a tensor an adapter adds has no range, and int8's scope leaves its node float)
        return PassResult(model, modified=changed, preserved=PRESERVE_ALL)


__all__ = ["FORMAT_OPSETS", "RaiseOpset", "raise_opset", "required_opset"]
