"""Operator legalizations TVM's Relax ONNX importer relies on but TVM's own registry lacks.

TVM 0.27's importer converts ONNX ``CumSum`` (RoBERTa's position ids: ``cumsum(mask) * mask + padding_idx``) to
``relax.cumsum``, but registers no ``FLegalize`` for it, so any such model stopped at "TVM has no implementation of
relax.cumsum". TOPI has the scan (``topi.cumsum`` / ``topi.cumprod``): registering it as the legalization lets the
node lower like any other TVM operator. Registration is global to the process and done once; an existing
legalization (a newer TVM) is never replaced.
"""

from __future__ import annotations

import functools
from typing import Any


def _scan(topi_fn_name: str):  # noqa: ANN202 - returns a TVM legalization callback
    def legalize(bb: Any, call: Any) -> Any:
        from tvm import topi

        attrs = call.attrs
        axis = None if attrs.axis is None else int(attrs.axis)
        dtype = str(attrs.dtype) if attrs.dtype is not None and str(attrs.dtype) else None
        exclusive = None if attrs.exclusive is None else bool(attrs.exclusive)
        return bb.call_te(getattr(topi, topi_fn_name), call.args[0], axis, dtype, exclusive)

    return legalize


#: relax operator -> its legalization, for those this TVM may lack
MISSING = {"relax.cumsum": _scan("cumsum"), "relax.cumprod": _scan("cumprod")}


@functools.cache
def register_missing() -> tuple[str, ...]:
    """Register the legalizations in ``MISSING`` that this TVM does not have; returns the names registered."""
    import tvm

    added = []
    for name, legalize in MISSING.items():
        try:
            op = tvm.ir.Op.get(name)
        except Exception:  # noqa: BLE001 - an operator this TVM does not define: nothing to legalize
            continue
        if op.get_attr("FLegalize") is None:
            tvm.ir.register_op_attr(name, "FLegalize", legalize)
            added.append(name)
    return tuple(added)
