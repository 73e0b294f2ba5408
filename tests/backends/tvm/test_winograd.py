"""Winograd's F(m×m, 3×3) fp32 conv (``winograd.conv2d``): the direct conv's values to within its rounding, on the
layouts the lowering hands it, and which convs the lowering gives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")

from bitpass.backends.tvm import kernels, lower, targets, winograd  # noqa: E402
from bitpass.frontend import from_torch  # noqa: E402

SPEC = targets.get(targets.host_target())
HOST = tvm.target.Target(SPEC.tvm_dict())
AVX512 = kernels.scheme_for(targets.get("x86-64-avx512").features)
rng = np.random.default_rng(0)


def _nchwc(a: np.ndarray, halo: int = 0) -> np.ndarray:
    """NCHW → blocked NCHW16c with ``halo`` pixels of zeros around each plane."""
    n, c, h, w = a.shape
    out = a.reshape(n, c // 16, 16, h, w).transpose(0, 1, 3, 4, 2)
    return np.ascontiguousarray(np.pad(out, ((0, 0), (0, 0), (halo, halo), (halo, halo), (0, 0))))


def test_the_transform_matrices_compute_a_1d_correlation_exactly():
    """F(m, 3) in one dimension: Aᵀ[(G g) ⊙ (Bᵀ d)] is the correlation of m+2 inputs with 3 taps (float64)."""
    for m in (2, 4):
        at, g, bt = winograd.matrices(m)
        d, taps = rng.standard_normal(m + 2), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ taps for i in range(m)])
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="m is 2 or 4"):
        winograd.matrices(6)


def test_which_convs_it_computes():
    """3×3, stride 1, padding 1, undilated, one group, blocked in and out, 32-channel output blocks; 4×4 tiles where
    they cover the output exactly, else 2×2 (partial ones on an odd plane)."""
    assert (winograd.tile_size(56, 56), winograd.tile_size(14, 14), winograd.tile_size(7, 7)) == (4, 2, 2)
    ok = dict(block_in=16, block_out=16, c=32, oc=64, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1),
              dilations=(1, 1), groups=1, pool=(0, 0, 0), out_hw=(28, 28))
    assert winograd.supported(**ok)
    for change in ({"block_in": 0}, {"block_out": 0}, {"oc": 48}, {"kernel": (1, 1)}, {"strides": (2, 2)},
                   {"pads": (0, 0, 0, 0)}, {"dilations": (2, 2)}, {"groups": 2}, {"pool": (3, 2, 1)},
                   {"c": 24}, {"c": 2048}):  # 2048: a register tile's scratch > 1 MiB
        assert not winograd.supported(**{**ok, **change}), change
    assert winograd.pack_weights(rng.standard_normal((64, 32, 3, 3)), 4).shape == (36, 2, 32, 32)
    assert winograd.weight_bytes(64, 32, 2) == 16 * 64 * 32 * 4


@pytest.mark.parametrize(("n", "c", "oc", "hw", "residual", "halos", "act"), [
    (1, 32, 64, 8, True, (1, 1, 1), "relu"),  # F(4×4), every tensor bordered (batch 1 in the lowering)
    (2, 16, 32, 12, False, (0, 0, 0), "relu"),  # F(4×4), no border: the padding read as zeros (batch ≥ 8)
    (1, 48, 32, 6, True, (0, 1, 0), "relu"),  # F(2×2)
    (3, 16, 64, 10, True, (2, 2, 1), "relu"),  # borders wider than the padding, three samples
    (1, 16, 32, 14, False, (1, 0, 1), "relu"),  # one output block per task part, odd tile rows
    (1, 32, 32, 4, False, (1, 1, 0), "none"),  # one row of tiles: its task writes the top and bottom borders
    (2, 16, 32, 40, True, (1, 1, 1), "relu"),  # 100 tiles a sample cut into spans of 5 (scratch bounded below)
    (1, 32, 64, 7, True, (1, 1, 1), "relu"),  # partial 2×2 tiles: reads past the plane zeros, outputs not stored
    (2, 16, 32, 5, False, (0, 0, 0), "none"),  # the same without borders
])
def test_winograd_conv_is_the_direct_conv_to_within_its_rounding(n, c, oc, hw, residual, halos, act, monkeypatch):
    """Against torch's conv in float64: the largest error at most 1e-5 of the output's largest magnitude (F(4×4)
    measured 1.9-4.2e-6, F(2×2) 1.3-2.7e-7); the output's border is zeros (the buffer starts as NaN)."""
    if not {"avx512", "vnni"} <= SPEC.features:
        pytest.skip("the Winograd conv is built for AVX-512 (16 lanes)")
    if hw == 40:  # a span of one register tile (5 tiles)
        monkeypatch.setattr(winograd, "SCRATCH_BYTES", 1)
        assert winograd.span(c, 4, 100) == 5
    monkeypatch.setattr(winograd, "PARTIAL_TILES", True)  # the 7×7 and 5×5 planes (off in the lowering by default)
    winograd.conv2d.cache_clear()  # built for this test's SCRATCH_BYTES
    halo_in, halo_out, halo_res = halos
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((oc, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = (0.1 * rng.standard_normal(oc)).astype(np.float32)
    r = rng.standard_normal((n, oc, hw, hw)).astype(np.float32)
    want = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                      torch.from_numpy(b).double(), padding=1).numpy()
    want = want + r if residual else want
    want = _nchwc(np.maximum(want, 0) if act == "relu" else want, halo_out)
    func = winograd.conv2d((n, c, hw, hw), oc, act, True, residual, halo_in, halo_out, halo_res)
    built = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)["main"]
    dev = tvm.cpu()
    args = [_nchwc(x, halo_in), winograd.pack_weights(w, winograd.tile_size(hw, hw)), b,
            *([_nchwc(r, halo_res)] if residual else [])]
    got = tvm.runtime.tensor(np.full(want.shape, np.nan, np.float32), dev)
    built(*[tvm.runtime.tensor(a, dev) for a in args], got)
    got = got.numpy()
    assert not np.isnan(got).any(), "an output pixel or border pixel was not written"
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


class _Block(torch.nn.Module):
    """A stem, a basic block at 12×12 (4×4 tiles), a strided conv, a conv at 6×6 (2×2 tiles), another strided conv,
    a 3×3 conv at 3×3 (partial 2×2 tiles), a dilated one and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.down = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.down2 = torch.nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.odd = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.dilated = torch.nn.Conv2d(64, 64, 3, padding=2, dilation=2)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        x = torch.relu(self.conv3(torch.relu(self.down(x))))
        x = torch.relu(self.odd(torch.relu(self.down2(x))))
        x = torch.relu(self.dilated(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("partial", [False, True], ids=["exact-tiles", "partial-tiles"])
def test_the_lowering_gives_winograd_the_3x3_convs_it_tiles_and_records_it(batch, partial, monkeypatch):
    """On AVX-512, the lowering alone (any host): the stride-1 3×3 convs between blocked activations whose output
    run ``conv2d_winograd``, the manifest naming the algorithm and its (larger) weight bytes; the stem (NCHW
    image), the strided and the dilated convs stay direct, the 3×3 plane too unless ``PARTIAL_TILES``;
    ``WINOGRAD`` off: all direct."""
    monkeypatch.setattr(winograd, "PARTIAL_TILES", partial)
    torch.manual_seed(0)
    model = from_torch(_Block().eval(), (torch.zeros(batch, 3, 12, 12),))
    _, report, _ = lower.lower(model, (batch,), AVX512)
    kinds = {name: (entry["kernel"], entry.get("algorithm")) for name, entry in report.layers.items()}
    assert kinds == {"stem": ("conv2d", None), "conv1": ("conv2d_winograd", "Winograd F(4x4, 3x3)"),
                     "conv2": ("conv2d_winograd", "Winograd F(4x4, 3x3)"), "down": ("conv2d", None),
                     "conv3": ("conv2d_winograd", "Winograd F(2x2, 3x3)"), "down2": ("conv2d", None),
                     "odd": ("conv2d_winograd", "Winograd F(2x2, 3x3)") if partial else ("conv2d", None),
                     "dilated": ("conv2d", None),
                     "fc": ("dense", None)}
    assert report.layers["conv1"]["weight_bytes"] == 36 * 32 * 32 * 4
    assert report.layers["conv1"]["epilogue"] == "bias+relu"
    assert report.layers["conv2"]["epilogue"] == "bias+residual+relu"
    monkeypatch.setattr(lower, "WINOGRAD", False)
    _, report, _ = lower.lower(model, (batch,), AVX512)
    assert {entry["kernel"] for entry in report.layers.values()} == {"conv2d", "dense"}


def test_a_plan_with_quantized_layers_keeps_the_direct_conv():
    """A mixed or quantized plan was sized by its allocation with fp32 weights at 4 bytes each: Winograd's transformed
    weights (up to 4× the bytes) would overrun a size budget, so with any layer below 32 bits every fp32 conv stays
    direct."""
    from bitpass.frontend import annotation

    torch.manual_seed(0)
    model = from_torch(_Block().eval(), (torch.zeros(1, 3, 12, 12),))
    annotation.set_weight_bits(next(layer for layer in model.layers() if layer.op_type == "Gemm").node, 8)
    _, report, _ = lower.lower(model, (1,), AVX512)
    assert report.layers["conv1"]["kernel"] == "conv2d" and report.layers["fc"]["weight_bits"] == 8
    assert "conv2d_winograd" not in {entry["kernel"] for entry in report.layers.values()}


@pytest.mark.parametrize(("batch", "partial"), [(1, True), (8, False)])
def test_a_model_with_winograd_convs_computes_what_torch_does(batch, partial, monkeypatch):
    """Built for the host and run in TVM's VM: the outputs of ``_Block`` (seeded weights) within 1e-4 of torch's,
    at batch 1 (bordered activations, partial tiles on the 3×3 plane) and 8 (no borders, exact tiles only)."""
    monkeypatch.setattr(winograd, "PARTIAL_TILES", partial)
    if not {"avx512", "vnni"} <= SPEC.features:
        pytest.skip("the Winograd conv is built for AVX-512 (16 lanes)")
    from tvm import relax

    from bitpass.backends.tvm import build

    torch.manual_seed(0)
    module = _Block().eval()
    model = from_torch(module, (torch.zeros(batch, 3, 12, 12),))
    built = build.build(model, SPEC, batches=(batch,))
    assert sum(entry["kernel"] == "conv2d_winograd" for entry in built.report.layers.values()) == 3 + partial
    x = torch.randn(batch, 3, 12, 12)
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    got = vm[built.functions[batch]](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
