"""The kernel-attribute schema: what the lowering writes on a kernel's PrimFunc is what the schedules read."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")
from tvm import te  # noqa: E402

from bitpass.backends.tvm import kernels  # noqa: E402
from bitpass.backends.tvm.kernel_attrs import KernelAttrs  # noqa: E402


def _func():
    x, w = te.placeholder((2, 8), "float32"), te.placeholder((1, 8, 16), "float32")
    return te.create_prim_func([x, w, kernels.dense(x, w, None)])


def test_attributes_round_trip_through_a_primfunc():
    tags = KernelAttrs("conv2d_int8", 32, act="relu", residual=True, taps=3, levels=127, strides=(2, 2),
                       pads=(1, 0, 1, 0), dilations=(1, 1), groups=1, amax_in=True, amax_out=True, pool=(3, 2, 1))
    func = tags.tag(_func())
    assert KernelAttrs.of(func) == tags
    blocked = KernelAttrs("conv2d", 32, block_in=16, block_out=16, halo_in=1, halo_out=1, halo_res=1)
    assert KernelAttrs.of(blocked.tag(_func())) == blocked
    # and survive TVMScript printing and parsing, as a module does between passes
    reparsed = tvm.script.from_source(tvm.IRModule({"main": func}).script())["main"]
    assert KernelAttrs.of(reparsed) == tags


def test_defaults_fill_what_a_kernel_does_not_say():
    tags = KernelAttrs.of(KernelAttrs("dense", 16).tag(_func()))
    assert (tags.act, tags.residual, tags.levels, tags.groups, tags.pads) == ("none", False, 0, 1, (0, 0, 0, 0))
    assert (tags.amax_in, tags.amax_out, tags.pool, tags.block_in, tags.block_out) == (False, False, (0, 0, 0), 0, 0)


def test_untagged_functions_are_not_kernels():
    assert KernelAttrs.of(_func()) is None


@pytest.mark.parametrize(("kwargs", "message"), [({"kernel": "matmul", "nb": 8}, "not one of"),
                                                  ({"kernel": "dense", "nb": 8, "act": "gelu"}, "activation"),
                                                  ({"kernel": "dense", "nb": 0}, "positive"),
                                                  ({"kernel": "dense_int8", "nb": 16, "amax_in": True}, "absmax"),
                                                  ({"kernel": "dense", "nb": 16, "pool": (3, 2, 1)}, "max pooling"),
                                                  ({"kernel": "conv2d_int8", "nb": 16, "block_out": 16}, "blocked"),
                                                  ({"kernel": "conv2d", "nb": 16, "halo_in": 1}, "border"),
                                                  ({"kernel": "conv2d", "nb": 16, "block_in": 16, "halo_out": 1},
                                                   "border")])
def test_invalid_attributes_are_refused_where_they_are_written(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KernelAttrs(**kwargs)
