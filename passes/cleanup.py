"""fp32 clean-up: constant folding and dead-node elimination.

Both passes are thin wrappers over library passes (onnxscript's constant
folder, onnx-ir's common passes); bitpass only chooses their settings. The
one setting that matters: onnxscript's default limits (8,192 input elements,
never ``ConstantOfShape``) are tuned for keeping models small, so a weight
built as ``ConstantOfShape -> Mul -> Add`` stays a subgraph, and every
quantization pass after it would see a layer without a constant weight.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import pydantic
from onnxscript.optimizer import fold_constants

from bitpass.frontend import Model
from bitpass.frontend.layers import assign_layer_ids
from bitpass.passes.infra import PRESERVE_ALL, Pass, PassConfig, PassContext, PassResult

#: Folded tensors up to this many elements are stored (2**27: a 32k x 4k fp32 embedding, 512 MiB).
DEFAULT_MAX_ELEMENTS = 1 << 27


def _result(model: Model, modified: bool) -> PassResult:
    return PassResult(model, modified, frozenset() if modified else PRESERVE_ALL)


class FoldConstants(Pass):
    """Fold constant subgraphs (ConstantOfShape included) into initializers.

    Weights computed in the graph (``ConstantOfShape``, ``Constant``, ``Cast``,
    ``Reshape``, ``Transpose`` or arithmetic on constants) become plain
    initializers, so layers are recognised as quantizable and BN folding, which
    needs initializer weights, can apply.
    """

    name = "fold-constants"

    class Config(PassConfig):
        #: largest folded tensor kept, in elements; bigger results stay computed in the graph
        max_elements: int = pydantic.Field(DEFAULT_MAX_ELEMENTS, gt=0)
        #: fold ConstantOfShape too (onnxscript keeps it by default to keep files small)
        constant_of_shape: bool = True
        #: use ONNX shape inference while folding (lets Shape -> Reshape chains with static dims fold)
        shape_inference: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        config = self.config
        assert isinstance(config, FoldConstants.Config)

        def should_fold(node: ir.Node) -> bool | None:
            # True bypasses onnxscript's blacklist and input-size limit; the output
            # limit (max_elements) still applies. None means "default rules".
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
        return _result(model, modified)


class EliminateDeadNodes(Pass):
    """Remove Identity nodes, and nodes, initializers, functions and opsets no output depends on."""

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
            passes.insert(0, ir_passes.IdentityEliminationPass())
        modified = False
        for pass_ in passes:
            modified |= pass_(model.ir).modified
        return _result(model, modified)
