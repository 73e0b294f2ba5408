"""fp32 fusions as onnxscript rewrite rules, with bitpass annotations merged by bitpass's policy.

Every pass here applies onnxscript rewriter rules (declarative pattern ->
replacement with a condition). The one rule bitpass writes itself is
``GemmAsMatMulAdd``: onnxscript's ``gemm_to_matmul_add_rule`` only matches
``Reshape -> Gemm -> Reshape`` with default alpha/beta and no transposes,
never the plain ``Gemm(transB=1)`` that torch exports for ``nn.Linear``.

Annotations: the rewriter copies the matched nodes' ``metadata_props`` onto
the replacement, first value wins unless a merger is registered for the key.
onnxscript has no public hook for custom mergers yet (see the TODO above
``_default_metadata_merger`` in ``onnxscript/rewriter/_rewrite_rule.py``), so
``_bitpass_metadata_merger`` swaps that module global for the duration of a
rewrite for ``BitpassMetadataMerger``, which applies ``annotation.merge_raw``
to every ``bitpass.*`` key with the weight-bearing node's value first.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import pydantic
from onnxscript.rewriter import RewriteRule, RewriteRuleClassBase, RewriteRuleSet, _rewrite_rule
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules import common as rules
from onnxscript.utils import metadata_merger

from bitpass.frontend import Model, annotation
from bitpass.frontend.layers import WEIGHT_INPUT, assign_layer_ids, weight_value
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult

# --- annotations -----------------------------------------------------------


class _MergerTable(dict[str, metadata_merger.StringMerger]):
    """onnxscript's merger lookup (``mergers.get(key, default)``), answering every ``bitpass.*`` key."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key.startswith(annotation.PREFIX):
            return functools.partial(annotation.merge_raw, key)
        return super().get(key, default)


class BitpassMetadataMerger(metadata_merger.MetadataMerger):
    """onnxscript's default merger (rule names joined) plus bitpass's per-key annotation policy.

    onnxscript lists a match's nodes root first (the BN before its Conv), but
    bitpass's policy says the weight-bearing node's value comes first (its layer
    id wins), so weight-bearing nodes are moved to the front before merging.
    """

    def __init__(self) -> None:
        super().__init__(_MergerTable({_rewrite_rule.RULE_NAME_TAG: metadata_merger.comma_separator_merger}))

    def copy_merged_metadata(self, from_nodes: Iterable[ir.Node], to: ir.Node | Iterable[ir.Node]) -> None:
        # The matched nodes are already detached (inputs cleared), so judge by op type.
        ordered = sorted(from_nodes, key=lambda node: node.op_type not in WEIGHT_INPUT)
        super().copy_merged_metadata(ordered, to)


@contextlib.contextmanager
def _bitpass_metadata_merger() -> Iterator[None]:
    # Not thread-safe: the merger is a module global of onnxscript (no public hook yet).
    saved = _rewrite_rule._default_metadata_merger
    _rewrite_rule._default_metadata_merger = BitpassMetadataMerger()
    try:
        yield
    finally:
        _rewrite_rule._default_metadata_merger = saved


def _settle_annotations(graph: ir.Graph) -> None:
    """Keep layer annotations on the quantizable node only.

    When one node is replaced by several (Gemm -> MatMul + Add), onnxscript copies
    the merged metadata to all of them; the Add must not claim the MatMul's layer.
    """
    owners = {annotation.layer_id(n) for n in graph if weight_value(n) is not None} - {None}
    for node in graph:
        if weight_value(node) is None and annotation.layer_id(node) in owners:
            for key in [k for k in node.metadata_props if k.startswith(annotation.PREFIX)]:
                del node.metadata_props[key]


def apply_rules(model: Model, rule_list: Sequence[RewriteRule], *, max_rounds: int = 8) -> int:
    """Apply ``rule_list`` until nothing matches (at most ``max_rounds``); returns the rewrite count."""
    if any(_needs_shapes(rule) for rule in rule_list):
        # Rank checks (MatMul -> Gemm, Pad -> Conv) need shapes; old-opset imports often lack them.
        ir_passes.ShapeInferencePass(strict_mode=False)(model.ir)
    rule_set = RewriteRuleSet(list(rule_list))
    total = 0
    with _bitpass_metadata_merger():
        for _ in range(max_rounds):
            count = rule_set.apply_to_model(model.ir)
            total += count
            if count == 0:
                break
    _forget_matched_graph(rule_list)
    if total:
        ir_passes.RemoveUnusedNodesPass()(model.ir)  # BN statistics and replaced weights
        _settle_annotations(model.graph)
        assign_layer_ids(model.graph)
    return total


def _forget_matched_graph(rule_list: Sequence[RewriteRule]) -> None:
    """Drop what onnxscript's pattern matchers keep of the last graph they matched (``_graph``, the match's
    bindings): the rules are module-level, so that graph, and every weight tensor its values held, stayed alive
    for the rest of the process: a 355 M GPT-2's imported weights survived every pass that replaced them."""
    for rule in rule_list:
        matcher = getattr(rule, "_matcher", None)
        for state in ("_graph", "_match", "_current_node", "_tracer"):
            if matcher is not None and hasattr(matcher, state):
                setattr(matcher, state, None)


def _needs_shapes(rule: RewriteRule) -> bool:
    return rule in _SHAPE_RULES


def _result(model: Model, count: int) -> PassResult:
    return PassResult(model, count > 0, frozenset() if count else PRESERVE_ALL)


# --- Gemm -> MatMul + Add (bitpass's own rule) ------------------------------


class GemmAsMatMulAdd(RewriteRuleClassBase):
    """``Gemm(A, B, C)`` with a constant ``B`` -> ``MatMul(A, B') + C'``, alpha/beta/transB folded into B', C'.

    onnxscript's ``gemm_to_matmul_add_rule`` needs Reshape around the Gemm and
    default attributes, so bitpass writes this one rule itself.
    """

    def pattern(self, op: Any, a: ir.Value, b: ir.Value) -> Any:
        return op.Gemm(a, b, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context: Any, a: ir.Value, b: ir.Value, out: ir.Value) -> MatchResult:
        del context, a, out
        result = MatchResult()
        if b.const_value is None or b.is_graph_input():
            return result.fail(f"weight {b.name} is not a constant initializer")
        if len(b.const_value.shape) != 2:
            return result.fail(f"weight {b.name} is not 2-D")
        return result

    def rewrite(self, op: Any, a: ir.Value, b: ir.Value, out: ir.Value) -> Any:
        node = out.producer()
        assert node is not None
        attrs = node.attributes
        alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
        weight = b.const_value.numpy()  # type: ignore[union-attr]
        if attrs.get_int("transB", 0):
            weight = weight.T
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, weight.dtype)
        if attrs.get_int("transA", 0):
            a = op.Transpose(a, perm=[1, 0])
        # Reuse the weight's name when only this Gemm reads it (initializer names feed layer ids);
        # onnxscript overwrites an initializer of the same name, so shared ones get a fresh name.
        unchanged = not attrs.get_int("transB", 0) and alpha == 1.0
        y = op.MatMul(a, b if unchanged else op.initializer(ir.tensor(np.ascontiguousarray(weight)),
                                                            name=_own_name(b, "matmul")))
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is None or beta == 0.0:
            return y
        if c.const_value is not None and not c.is_graph_input():
            if beta != 1.0:
                bias = c.const_value.numpy()
                c = op.initializer(ir.tensor(bias * np.asarray(beta, bias.dtype)), name=_own_name(c, "scaled"))
        elif beta != 1.0:
            dtype = c.dtype.numpy() if c.dtype is not None else np.float32
            c = op.Mul(c, op.initializer(ir.tensor(np.asarray(beta, dtype)),
                                         name=_fresh_name(b.graph, f"{c.name}_beta")))
        return op.Add(y, c)


def _own_name(value: ir.Value, suffix: str) -> str:
    """``value``'s name when only one node reads it, else a name no initializer has."""
    name = value.name or "w"
    return name if len(value.uses()) == 1 else _fresh_name(value.graph, f"{name}_{suffix}")


def _fresh_name(graph: ir.Graph | None, base: str) -> str:
    taken = graph.initializers if graph is not None else {}
    name, index = base, 1
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    return name


gemm_as_matmul_add_rule = GemmAsMatMulAdd().rule()

# --- rule groups -----------------------------------------------------------

#: BN into the preceding Conv / ConvTranspose / Gemm (onnxscript has no MatMul variant).
BATCHNORM_RULES: tuple[RewriteRule, ...] = (
    rules.fuse_batchnorm_into_conv_rule,
    rules.fuse_batchnorm_into_conv_transpose_rule,
    rules.fuse_batchnorm_into_gemm_rule,
)
#: MatMul + Add -> Gemm, also with the bias as Add's first input (``commute``).
MATMUL_ADD_RULES: tuple[RewriteRule, ...] = tuple(
    variant
    for rule in (rules.transpose_ab_matmul_add_to_gemm_rule, rules.transpose_a_matmul_add_to_gemm_rule,
                 rules.transpose_b_matmul_add_to_gemm_rule, rules.matmul_add_to_gemm_rule)
    for variant in rule.commute()
)
ACTIVATION_RULES: tuple[RewriteRule, ...] = (
    rules.successive_clip_relu_rule,
    rules.successive_relu_clip_rule,
    rules.successive_relu_rule,
    rules.successive_clip_rule,
    rules.min_min_rule,
    rules.max_max_rule,
    rules.min_max_rule,
    rules.max_min_rule,
    *rules.fuse_hardswish_rules(),
    rules.normalize_pad_format_conv_rule,
    rules.fuse_pad_into_conv_rule,
)
_SHAPE_RULES = frozenset({*MATMUL_ADD_RULES, rules.normalize_pad_format_conv_rule, rules.fuse_pad_into_conv_rule})

# --- passes ----------------------------------------------------------------


class FuseBatchNorm(Pass):
    """Fold inference BatchNormalization into the preceding Conv, ConvTranspose or Gemm weights.

    Needs initializer weights (run fold-constants first); a BN after a MatMul,
    or after weights shared with another node, stays.
    """

    name = "fuse-batchnorm"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return _result(model, apply_rules(model, BATCHNORM_RULES))


class MatMulAddToGemm(Pass):
    """Merge 2-D MatMul + Add (Transposes included) into one Gemm, so the bias belongs to the layer.

    ONNX Runtime does the same at session time; doing it ahead of time makes
    the layer bitpass quantizes (and BN folding sees) the one that runs.
    """

    name = "matmul-add-to-gemm"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return _result(model, apply_rules(model, MATMUL_ADD_RULES))


class GemmToMatMulAdd(Pass):
    """Split Gemm with a constant weight into MatMul + Add, for backends whose low-bit kernels are MatMul-only.

    ORT's ``MatMulNBits`` replaces a MatMul with a (K, N) weight; alpha, beta and
    transB are folded into the constants, transA becomes a Transpose.
    """

    name = "gemm-to-matmul-add"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return _result(model, apply_rules(model, (gemm_as_matmul_add_rule,)))


class FuseActivations(Pass):
    """Collapse Relu/Clip chains, Min/Max into Clip, HardSigmoid/HardSwish patterns, and Pad into Conv.

    Conv/Gemm + Relu/Clip is deliberately not fused: ONNX Runtime fuses those
    itself when it builds the session (and its fused ops are contrib ops other
    backends lack). What is done here leaves standard ops that ORT has kernels
    for and makes the graph calibration and quantization see the one that runs.
    """

    name = "fuse-activations"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return _result(model, apply_rules(model, ACTIVATION_RULES))


class Fuse(Pass):
    """Run fuse-batchnorm, matmul-add-to-gemm and fuse-activations together until nothing changes."""

    name = "fuse"

    class Config(PassConfig):
        batchnorm: bool = True
        matmul_add: bool = True
        activations: bool = True
        #: rewrite rounds at most (each round applies every rule once over the graph)
        max_rounds: int = pydantic.Field(8, gt=0)

    groups: ClassVar[tuple[tuple[str, tuple[RewriteRule, ...]], ...]] = (
        ("matmul_add", MATMUL_ADD_RULES), ("batchnorm", BATCHNORM_RULES), ("activations", ACTIVATION_RULES),
    )

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        assert isinstance(self.config, Fuse.Config)
        chosen = [rule for key, group in self.groups if getattr(self.config, key) for rule in group]
        if not chosen:
            return _result(model, 0)
        return _result(model, apply_rules(model, chosen, max_rounds=self.config.max_rounds))
