"""fp32 clean-up: constant folding and dead-node elimination, subgraphs (If/Loop/Scan) included.

Both passes are thin wrappers over library passes (onnxscript's constant
folder, onnx-ir's common passes); bitpass only chooses their settings and
guards two of the libraries' edges:

* onnxscript's default limits (8,192 input elements, never ``ConstantOfShape``)
  are tuned for keeping models small, so a weight built as
  ``ConstantOfShape -> Mul -> Add`` stays a subgraph, and every quantization
  pass after it would see a layer without a constant weight. bitpass folds
  those, but caps what folding may add to the model (``max_added_bytes``): a
  143-byte model whose ``ConstantOfShape`` makes a 256 MiB tensor must not
  become a 256 MiB file (and several GB of peak memory). Over the cap, a node
  stays computed and the pass says which, the cap, and the option raising it.
* onnx-ir's ``IdentityEliminationPass`` merges ``y = Identity(x)`` into ``x``
  even when ``x`` is itself a graph output (a ``Scan`` body returning its state
  and a copy of it: both outputs became one, the scan output silently took
  the state's place) or a value of an enclosing graph (an ``If`` branch
  returning an outer value: the branch then produced nothing). Those
  Identities are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import pydantic
from onnxscript.optimizer import fold_constants

from bitpass.frontend import Model
from bitpass.frontend.layers import assign_layer_ids
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult

#: Folded tensors up to this many elements are stored (2**27: a 32k x 4k fp32 embedding, 512 MiB).
DEFAULT_MAX_ELEMENTS = 1 << 27
#: Folding may add at least this many bytes to a model (more for a big model: see ``folding_budget``).
DEFAULT_MAX_ADDED_BYTES = 64 << 20


def _result(model: Model, modified: bool) -> PassResult:
    return PassResult(model, modified, frozenset() if modified else PRESERVE_ALL)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def folding_budget(model: Model, max_added_bytes: int | None) -> int:
    """Bytes folding may add: ``max_added_bytes``, or by default 64 MiB or the model's own constant bytes,
    whichever is more (so a model whose weights are stored fp16 and Cast to fp32 still folds)."""
    if max_added_bytes is not None:
        return max_added_bytes
    return max(DEFAULT_MAX_ADDED_BYTES, model.weight_bytes())


def _predicted_bytes(node: ir.Node) -> int | None:
    """Bytes of ``node``'s outputs once folded, from their inferred static shapes; None when unknown."""
    total = 0
    for value in node.outputs:
        if value.shape is None or value.dtype is None or not all(isinstance(d, int) for d in value.shape):
            return None
        try:
            itemsize = value.dtype.itemsize
        except Exception:  # sub-byte and string types: no fixed size
            return None
        total += int(np.prod([int(d) for d in value.shape], dtype=np.float64) * itemsize)
    return total


def _freed_bytes(node: ir.Node) -> int:
    """Bytes of constant inputs only ``node`` reads: folding replaces them."""
    freed = 0
    for value in node.inputs:
        if value is not None and value.const_value is not None and len(value.uses()) == 1 \
                and not value.is_graph_output():
            freed += value.const_value.nbytes
    return freed


@dataclass
class FoldingBudget:
    """What folding may still add; nodes whose folding would exceed it stay computed (and are listed)."""

    cap: int
    left: int
    kept: list[tuple[str, int]] = field(default_factory=list)

    def allows(self, node: ir.Node) -> bool:
        predicted = _predicted_bytes(node)
        if predicted is None:
            return True  # unknown size: onnxscript's per-tensor element limit still applies
        added = predicted - _freed_bytes(node)
        if added > self.left:
            self.kept.append((node.name or node.outputs[0].name or node.op_type, predicted))
            return False
        self.left -= max(added, 0)
        return True

    def message(self) -> str:
        name, size = max(self.kept, key=lambda item: item[1])
        more = f" and {len(self.kept) - 1} more" if len(self.kept) > 1 else ""
        return (f"fold-constants: left {name!r} ({human_bytes(size)}){more} computed in the graph: folding may add "
                f"at most {human_bytes(self.cap)} to this model; fold-constants(max_added_bytes=N) raises the cap")


class FoldConstants(Pass):
    """Fold constant subgraphs (ConstantOfShape included) into initializers, within a size cap.

    Weights computed in the graph (``ConstantOfShape``, ``Constant``, ``Cast``,
    ``Reshape``, ``Transpose`` or arithmetic on constants) become plain
    initializers, so layers are recognised as quantizable and BN folding, which
    needs initializer weights, can apply. Nodes whose folded result would grow
    the model past ``max_added_bytes`` stay computed (recorded and reported).
    """

    name = "fold-constants"

    class Config(PassConfig):
        #: largest folded tensor kept, in elements; bigger results stay computed in the graph
        max_elements: int = pydantic.Field(DEFAULT_MAX_ELEMENTS, gt=0)
        #: bytes folding may add to the model in all (default: 64 MiB or the model's constant bytes, if more)
        max_added_bytes: int | None = pydantic.Field(None, ge=0)
        #: fold ConstantOfShape too (onnxscript keeps it by default to keep files small)
        constant_of_shape: bool = True
        #: use ONNX shape inference while folding (lets Shape -> Reshape chains with static dims fold)
        shape_inference: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        config = self.config
        assert isinstance(config, FoldConstants.Config)
        cap = folding_budget(model, config.max_added_bytes)
        budget = FoldingBudget(cap, cap)

        def should_fold(node: ir.Node) -> bool | None:
            # False keeps the node; True bypasses onnxscript's blacklist and input-size limit (the output
            # limit, max_elements, still applies); None means "default rules".
            if not budget.allows(node):
                return False
            if node.domain in ("", "ai.onnx") and node.op_type == "ConstantOfShape":
                return True if config.constant_of_shape else None
            return None

        folded = fold_constants(
            model.ir,
            onnx_shape_inference=config.shape_inference,
            input_size_limit=config.max_elements,
            output_size_limit=config.max_elements,
            should_fold=should_fold,
        )
        modified = folded.modified
        if modified:  # drop the Constant nodes folding orphaned before lifting them
            ir_passes.RemoveUnusedNodesPass()(model.ir)
        # Constant nodes (the folder leaves them as they are) become initializers:
        # the rewriter's BN/Gemm rules and the quantizers look for initializers.
        modified |= ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model.ir).modified
        # A layer whose weight was computed at import had no id; now that it is constant it gets one.
        modified |= assign_layer_ids(model.graph) > 0
        if budget.kept:
            ctx.progress(budget.message())
            ctx.records["fold-constants"] = {
                "max_added_bytes": cap,
                "kept_computed": [{"node": name, "bytes": size} for name, size in budget.kept],
                "note": budget.message(),
            }
        return _result(model, modified)


class _GuardedIdentityElimination(ir_passes.IdentityEliminationPass):
    """onnx-ir's identity elimination, keeping the Identities it would merge wrongly (see module docstring)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and node.inputs[0] is not None \
                and node.outputs and node.outputs[0].is_graph_output():
            source = node.inputs[0]
            producer = source.producer()
            defined_in = producer.graph if producer is not None else source.graph
            if source.is_graph_output() or defined_in is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


class EliminateDeadNodes(Pass):
    """Remove Identity nodes, and nodes, initializers, functions and opsets no output depends on (subgraphs too)."""

    name = "eliminate-dead-nodes"

    class Config(PassConfig):
        #: also bypass Identity nodes (those not producing a graph output)
        identities: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        assert isinstance(self.config, EliminateDeadNodes.Config)
        passes: list[ir.passes.PassBase] = [
            ir_passes.RemoveUnusedNodesPass(),
            ir_passes.RemoveUnusedFunctionsPass(),
            ir_passes.RemoveUnusedOpsetsPass(),
        ]
        if self.config.identities:
            passes.insert(0, _GuardedIdentityElimination())
        modified = False
        for pass_ in passes:
            modified |= pass_(model.ir).modified
        return _result(model, modified)
