"""The lowering's rules between bitpass's kernels: what consecutive int8 convolutions pass each other."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")

from bitpass.backends.tvm import build, kernels, schedules, targets  # noqa: E402
from bitpass.frontend import annotation, from_torch  # noqa: E402

SPEC = targets.get(targets.host_target())


class _ResidualCnn(torch.nn.Module):
    """ResNet's shape in small: stem conv + ReLU, max pooling, a basic block (its skip added in the second conv's
    epilogue), a strided conv, global pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.conv1 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.down = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        x = torch.relu(self.down(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def int8_cnn():
    """(the torch module, its bitpass Model with every conv annotated 8-bit)"""
    torch.manual_seed(0)
    module = _ResidualCnn().eval()
    model = from_torch(module, (torch.zeros(1, 3, 16, 16),))
    for layer in model.layers():
        if layer.op_type == "Conv":
            annotation.set_weight_bits(layer.node, 8)
    return module, model


def _run(model, scheme, monkeypatch, x):
    from tvm import relax

    monkeypatch.setattr(kernels, "scheme_for", lambda _features: scheme)
    built = build.build(model, SPEC, batches=(len(x),))
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    return vm[built.functions[len(x)]](tvm.runtime.tensor(x)).numpy(), built.report


def test_consecutive_int8_convs_carry_the_absmax_and_compute_what_each_would_alone(int8_cnn, monkeypatch):
    """On a VNNI target each int8 conv read by another int8 conv takes its output's per-sample absmax in its
    epilogue (the stem's passes through the max pooling: non-negative, every pixel in a window), and the
    reader quantizes with it instead of a pass of its own: the same outputs as without carrying."""
    module, model = int8_cnn
    scheme = kernels.scheme_for(SPEC.features)
    if not scheme.int8_amax_carry:
        pytest.skip("this CPU's int8 kernels do not carry the absmax (no AVX-512 VNNI)")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    carried, report = _run(model, scheme, monkeypatch, x)
    alone, report_alone = _run(model, dataclasses.replace(scheme, int8_amax_carry=False), monkeypatch, x)
    convs = [entry for entry in report.layers.values() if entry["kernel"] == "conv2d_int8"]
    assert len(convs) == 4
    assert [entry.get("input_absmax") for entry in convs] == [None, "carried", "carried", "carried"]
    assert ["absmax" in entry["epilogue"] for entry in convs] == [True, True, True, False]
    assert not any("input_absmax" in entry or "absmax" in entry["epilogue"] for entry in report_alone.layers.values())
    np.testing.assert_allclose(carried, alone, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        reference = module(torch.from_numpy(x)).numpy()
    cosine = (carried * reference).sum(1) / np.linalg.norm(carried, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99  # int8 error only


@pytest.mark.parametrize(("features", "carried"), [({"avx512", "avx2", "vnni"}, True), ({"avx2"}, False),
                                                   (set(), False)])
def test_only_targets_whose_int8_conv_takes_the_absmax_in_its_epilogue_carry_it(int8_cnn, features, carried):
    """The lowering alone (no build, any host): VNNI's micro-kernel takes the absmax in its epilogue; AVX2's
    kernel and the portable schedule do not, and their convs keep their own pass over the input."""
    from bitpass.backends.tvm import lower

    _, model = int8_cnn
    _, report, _ = lower.lower(model, (1,), kernels.scheme_for(features))
    convs = [entry for entry in report.layers.values() if entry["kernel"] == "conv2d_int8"]
    assert len(convs) == 4
    assert any(entry.get("input_absmax") == "carried" for entry in convs) == carried


def test_an_int8_conv_read_by_a_max_pooling_computes_it_in_its_epilogue_with_the_same_outputs(int8_cnn, monkeypatch):
    """On a VNNI target the stem's int8 conv takes the max pooling that reads it into its epilogue (its full
    output never reaches memory): the pooling node is gone, the outputs are those of conv and pooling apart,
    bit for bit (max is exact, and so is the absmax the pooled output passes on)."""
    module, model = int8_cnn
    scheme = kernels.scheme_for(SPEC.features)
    if not scheme.int8_pool:
        pytest.skip("this CPU's int8 conv does not fuse a max pooling (no AVX-512 VNNI)")
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    fused, report = _run(model, scheme, monkeypatch, x)
    apart, report_apart = _run(model, dataclasses.replace(scheme, int8_pool=False), monkeypatch, x)
    stem = next(entry for entry in report.layers.values() if entry["kernel"] == "conv2d_int8")
    assert stem["epilogue"] == "bias+relu+maxpool+absmax"
    assert "MaxPool" not in report.ops and report_apart.ops["MaxPool"] == {"bitpass rule": 1}
    np.testing.assert_array_equal(fused, apart)


def test_an_fp32_conv_read_by_a_max_pooling_pools_in_its_epilogue_at_batches_of_enough_samples():
    """fp32: the stem conv computes the max pooling that reads it, a sample per parallel task, from batch
    ``kernels.POOL_MIN_TASKS`` (at batch 1 one task would leave a core idle: the pooling stays apart); both
    functions compute the module's outputs."""
    from tvm import relax

    torch.manual_seed(0)
    module = _ResidualCnn().eval()
    model = from_torch(module, (torch.zeros(1, 3, 16, 16),))
    batch = kernels.POOL_MIN_TASKS
    built = build.build(model, SPEC, batches=(batch, 1))
    stem = next(entry for entry in built.report.layers.values() if entry["kernel"] == "conv2d")
    assert stem["epilogue"] == "bias+relu+maxpool" and "MaxPool" not in built.report.ops
    if kernels.scheme_for(SPEC.features).fp32_block:  # AVX-512: the stem writes blocked, pooled there (batch 8)
        assert stem["activations"] == {"in": "float32", "out": "float32 NCHW16c"}
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    x = np.random.default_rng(2).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = vm[built.functions[batch]](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    one = vm[built.functions[1]](tvm.runtime.tensor(x[:1])).numpy()
    np.testing.assert_allclose(one, want[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("features", "fused"), [({"avx512", "avx2", "vnni"}, True), ({"avx2"}, False), (set(), False)])
def test_only_targets_whose_int8_conv_pools_in_its_epilogue_fuse_the_max_pooling(int8_cnn, features, fused):
    """The lowering alone (no build, any host): only VNNI's micro-kernel pools in its epilogue; elsewhere the
    max pooling stays a function of its own."""
    from bitpass.backends.tvm import lower

    _, model = int8_cnn
    _, report, _ = lower.lower(model, (1,), kernels.scheme_for(features))
    stem = next(entry for entry in report.layers.values() if entry["kernel"] == "conv2d_int8")
    assert ("maxpool" in stem["epilogue"]) == fused
    assert ("MaxPool" in report.ops) != fused


@pytest.mark.parametrize("halo", [True, False], ids=["border", "no-border"])
@pytest.mark.parametrize(("features", "blocked"),
                         [({"avx512", "avx2", "vnni"}, True), ({"avx2"}, False), (set(), False)])
def test_fp32_convs_pass_each_other_blocked_activations_only_on_avx512(features, blocked, halo, monkeypatch):
    """The lowering alone (no build, any host): on AVX-512 every fp32 conv read only by fp32 convs, a max pooling
    of them or a residual Add an fp32 conv fuses writes NCHW16c, and its readers read it so (the max pooling too);
    the last conv, read by the global pooling, writes NCHW. AVX2 and the portable path (aarch64) stay NCHW. With
    ``FP32_HALO`` the max pooling and the blocked-in, blocked-out convs write a 1-pixel zero border that their 3×3
    readers read in place (the stem, reading the NCHW image, writes none). Numerics:
    ``test_an_fp32_conv_read_by_a_max_pooling_...`` (this model, built, against torch) and ``test_kernels``."""
    from bitpass.backends.tvm import lower

    monkeypatch.setattr(lower, "FP32_HALO", halo)
    torch.manual_seed(0)
    model = from_torch(_ResidualCnn().eval(), (torch.zeros(1, 3, 16, 16),))
    _, report, _ = lower.lower(model, (1,), kernels.scheme_for(features))
    convs = ("conv2d", "conv2d_winograd")  # conv1 and conv2 run Winograd's algorithm on AVX-512 (test_winograd)
    layouts = {name: entry.get("activations") for name, entry in report.layers.items() if entry["kernel"] in convs}
    blocked16 = "float32 NCHW16c"
    bordered = f"{blocked16}, 1-pixel zero border" if halo else blocked16
    plain = "float32"
    want = {"stem": {"in": plain, "out": blocked16}, "conv1": {"in": bordered, "out": bordered},
            "conv2": {"in": bordered, "out": bordered}, "down": {"in": bordered, "out": plain}}
    assert layouts == (want if blocked else dict.fromkeys(want))
    assert report.ops["MaxPool"] == {"bitpass rule": 1}
    # from the batch at which the TE conv pads each sample in cache, no border (its stem pools in its epilogue)
    _, report, _ = lower.lower(model, (schedules.PER_SAMPLE_MIN_BATCH,), kernels.scheme_for(features))
    layouts = {name: entry.get("activations") for name, entry in report.layers.items() if entry["kernel"] in convs}
    assert all("border" not in str(layout) for layout in layouts.values())


@pytest.mark.parametrize("bits", [32, 8])
def test_a_dense_layer_with_outputs_not_filling_a_vector_gets_zero_columns_and_a_sliced_output(bits):
    """A 10-class head: its weight is widened with zero columns to a whole vector register (the fast tiles,
    on VNNI the micro-kernel), the padding sliced off the output; the result is the layer's."""
    from tvm import relax

    from bitpass.backends.tvm import lower

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7)).eval()
    model = from_torch(module, (torch.zeros(1, 64),))
    for layer in model.layers():
        annotation.set_weight_bits(layer.node, bits)
    scheme = kernels.scheme_for(SPEC.features)
    mod, _, _ = lower.lower(model, (3,), scheme)
    kinds = {32: "dense", 8: "dense_int8"}
    tiles = sorted(int(f.params[1].ty.shape[-2 if bits == 8 else -1]) for gv, f in mod.functions.items()
                   if gv.name_hint.startswith(f"bitpass_{kinds[bits]}"))
    assert tiles and all(tile % scheme.lanes == 0 for tile in tiles)  # 10 and 7 outputs: whole vectors
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    built = build.build(model, SPEC, batches=(3,))
    got = relax.VirtualMachine(built.executable, tvm.cpu())[built.functions[3]](tvm.runtime.tensor(x)).numpy()
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4 if bits == 32 else 0.05, atol=1e-4 if bits == 32 else 0.05)


class _DownsamplingCnn(torch.nn.Module):
    """ResNet's downsampling block in small: stem conv + ReLU and max pooling, a block whose first conv has stride
    2 and whose shortcut is a 1×1 stride-2 conv (no ReLU) added in the epilogue, a head conv, global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.conv1 = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.short = torch.nn.Conv2d(32, 64, 1, stride=2)
        self.head = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.short(x))
        x = torch.relu(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def calibrated_cnn():
    """(the torch module, its Model with every conv 8-bit, min-max activation ranges on 16 calibration samples)"""
    from bitpass.frontend.data import from_arrays
    from bitpass.passes.calibrate import compute_ranges

    torch.manual_seed(0)
    module = _DownsamplingCnn().eval()
    model = from_torch(module, (torch.zeros(1, 3, 16, 16),))
    calib = np.random.default_rng(2).standard_normal((16, 3, 16, 16)).astype(np.float32)
    ranges = compute_ranges(model, from_arrays({model.inputs[0].name: calib}, model.inputs))
    for layer in model.layers():
        if layer.op_type == "Conv":
            annotation.set_weight_bits(layer.node, 8)
    return module, model, ranges


def test_with_calibrated_ranges_int8_convs_pass_each_other_uint8_codes(calibrated_cnn, monkeypatch):
    """VNNI, with calibrated ranges: every int8 conv with a ReLU read only by int8 convs writes uint8 codes of the
    calibrated scale (the stem through its fused max pooling too), its readers take them in place; the block's
    second conv (no ReLU, read only as the shortcut conv's residual) writes signed int8 channels-last; the head
    (read by the global pooling) writes fp32. The outputs stay those of the per-sample scheme within int8 error
    on held-out inputs."""
    from tvm import relax

    module, model, ranges = calibrated_cnn
    scheme = kernels.scheme_for(SPEC.features)
    if not scheme.int8_codes:
        pytest.skip("this CPU's int8 conv does not pass codes (no AVX-512 VNNI)")
    monkeypatch.setattr(kernels, "scheme_for", lambda _features: scheme)
    x = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)  # not the calibration samples
    outputs = {}
    for label, given in (("codes", ranges), ("per sample", None)):
        built = build.build(model, SPEC, batches=(len(x),), ranges=given)
        vm = relax.VirtualMachine(built.executable, tvm.cpu())
        outputs[label] = vm[built.functions[len(x)]](tvm.runtime.tensor(x)).numpy()
        convs = [entry for entry in built.report.layers.values() if entry["kernel"] == "conv2d_int8"]
        assert len(convs) == 5
        if given is None:
            assert not any("activations" in entry for entry in convs)
    built = build.build(model, SPEC, batches=(1,), ranges=ranges)
    # stem, conv1, conv2, shortcut, head in graph order
    kinds = [entry.get("activations") for entry in built.report.layers.values() if entry["kernel"] == "conv2d_int8"]
    assert kinds == [{"in": "float32", "out": "uint8"}, {"in": "uint8", "out": "uint8"},
                     {"in": "uint8", "out": "int8 channels-last"}, {"in": "uint8", "out": "uint8"},
                     {"in": "uint8", "out": "float32"}]
    with torch.no_grad():
        reference = module(torch.from_numpy(x)).numpy()

    def cosine(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    assert cosine(outputs["codes"], reference).min() > 0.99
    assert cosine(outputs["codes"], outputs["per sample"]).min() > 0.99
    assert np.abs(outputs["codes"] - outputs["per sample"]).max() > 0  # a different scheme: the test can tell


@pytest.mark.parametrize("features", [{"avx2"}, set()])
def test_targets_without_the_vnni_conv_ignore_calibrated_ranges(calibrated_cnn, features):
    """AVX2 and the portable kernels keep fp32 between their int8 convs whatever ranges they are given."""
    from bitpass.backends.tvm import lower

    _, model, ranges = calibrated_cnn
    _, report, _ = lower.lower(model, (1,), kernels.scheme_for(features), ranges)
    convs = [entry for entry in report.layers.values() if entry["kernel"] == "conv2d_int8"]
    assert len(convs) == 5 and not any("activations" in entry for entry in convs)
