"""Build a lowered Relax module for a named target and export it as a shared library."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitpass.backends.tvm import kernels, schedules
from bitpass.backends.tvm import lower as lowering
from bitpass.backends.tvm.legalize import register_missing
from bitpass.backends.tvm.targets import TargetSpec
from bitpass.frontend import Model

#: batch sizes every artifact is compiled for; the runner splits or pads other batches onto them
BATCHES = (1, 64)


@dataclass
class Built:
    executable: Any  # tvm.relax.Executable
    functions: dict[int, str]  # batch -> function name
    report: lowering.LoweringReport


def build(model: Model, spec: TargetSpec, batches: Sequence[int] = BATCHES,
          step: Callable[[str], None] | None = None,
          ranges: Mapping[str, tuple[float, float]] | None = None) -> Built:
    """Lower, schedule with bitpass's rules for ``spec``'s features, and build a VM executable; ``step(name)``
    is told before each stage (the compile's progress); ``ranges``: calibrated activation ranges
    (``lower.lower``)."""
    import tvm
    from tvm import relax

    step = step or (lambda _name: None)
    step("lower to bitpass kernels and TVM operators")
    target = spec.tvm_target()
    mod, report, names = lowering.lower(model, batches, kernels.scheme_for(spec.features), ranges)
    # exp, tanh and erf as TVM's vectorizable approximations (libm's are scalar calls: GELU's erf was
    # 4x slower than a BERT layer's dense kernels)
    mod = relax.transform.FastMathTransform()(mod)
    register_missing()  # before LegalizeOps: operators TVM's importer emits but TVM cannot legalize itself
    mod = relax.transform.LegalizeOps()(mod)
    mod = fuse_elementwise(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    mod = schedules.apply_rules(mod, target)
    step("compile with LLVM (the long stage)")
    with tvm.transform.PassContext(opt_level=3):
        executable = relax.build(mod, target=target, relax_pipeline="default")
    return Built(executable, dict(zip(batches, names)), report)


def fuse_elementwise(mod):
    """TVM's operator fusion for the functions TVM's lowering made (chains of element-wise operators become
    one function: one pass over memory, one parallel region), leaving bitpass's kernels and TVM's matmuls
    as they are: they are marked opaque, so nothing fuses into them and their schedule rules still find
    their own blocks."""
    import tvm
    from tvm import relax, tirx

    from bitpass.backends.tvm.kernel_attrs import KernelAttrs

    mod = relax.transform.AnnotateTIROpPattern()(mod)
    out_fusable, opaque = 4, 8  # OpPatternKind: kOutEWiseFusable (matmul), kOpaque
    updates = {gv: func.with_attr("op_pattern", opaque) for gv, func in mod.functions.items()
               if isinstance(func, tirx.PrimFunc) and (KernelAttrs.of(func) is not None or
                                                        int(func.attrs.get("op_pattern", 0)) >= out_fusable)}
    if updates:
        mod = tvm.IRModule({gv: updates.get(gv, func) for gv, func in mod.functions.items()}, attrs=mod.attrs)
    mod = relax.transform.FuseOps()(mod)
    return relax.transform.FuseTIR()(mod)


def export(built: Built, path: Path, spec: TargetSpec) -> None:
    """``export_library`` with the target's (cross) compiler; weights are embedded in the library."""
    if spec.cross_compiler is None:
        built.executable.export_library(str(path))
        return
    from tvm.support import cc

    built.executable.export_library(str(path), fcompile=cc.cross_compiler(spec.cross_compiler))
