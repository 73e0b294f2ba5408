"""FP4 (E2M1), NF4 and FP8 (E4M3) codebook formats: the published value tables, nearest-value rounding on one
absmax scale per group, GPTQ's error compensation onto the same table, and ONNX graphs that rebuild exactly the
rounded weight at session start."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest

from bitpass.frontend import UsageError, annotation
from bitpass.passes.weight_only.codebooks import codebook, codebook_gptq, codebook_rtn
from bitpass.passes.weight_only.grid import output_error, rtn
from bitpass.passes.weight_only.passes import QuantizeWeights
from bitpass.passes.weight_only.quantize import Quantizer, Recipe


def test_the_tables_are_the_published_formats():
    fp4 = codebook("fp4")
    assert sorted(set(np.abs(fp4).tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] and len(fp4) == 16
    nf4 = codebook("nf4")
    assert len(nf4) == 16 and nf4.min() == -1.0 and nf4.max() == 1.0 and 0.0 in nf4
    fp8 = codebook("fp8")
    finite = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert len(fp8) == 256 and fp8.max() == 448.0
    assert np.array_equal(fp8[np.isfinite(finite)], finite[np.isfinite(finite)])
    with pytest.raises(ValueError, match="fp4, nf4, fp8"):
        codebook("int3")


@pytest.mark.parametrize("name", ["fp4", "nf4", "fp8"])
def test_rounding_picks_the_nearest_value_on_each_groups_absmax_scale(name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    q = codebook_rtn(w, name, 32)
    assert q.codes.dtype == np.uint8 and q.scales.shape == (2, 16)
    scaled = w / np.repeat(q.scales, 32, axis=0)
    book = codebook(name)
    best = np.abs(scaled[..., None] - book).min(axis=-1)
    assert np.allclose(np.abs(scaled - book[q.codes]), best, atol=1e-6), "every code is a nearest value"
    peaks = np.abs(w.reshape(2, 32, 16)).max(axis=1)
    assert np.allclose(np.abs(q.dequantize().reshape(2, 32, 16)).max(axis=1), peaks, rtol=1e-6), \
        "each group's largest weight is exact"


def test_codebooks_store_like_integer_grids_without_zero_points():
    w = np.random.default_rng(1).standard_normal((128, 64)).astype(np.float32)
    assert codebook_rtn(w, "nf4", 32).nbytes() == rtn(w, 4, 32).nbytes() - 64 * 4 // 2
    assert codebook_rtn(w, "fp8", 128).nbytes() == 128 * 64 + 64 * 4


@pytest.mark.parametrize("name", ["fp4", "nf4"])
def test_gptq_onto_a_codebook_keeps_the_layer_output_closer_than_rounding(name):
    rng = np.random.default_rng(2)
    mix = np.eye(128) + 0.5 * rng.standard_normal((128, 128)) / np.sqrt(128)
    x = rng.standard_normal((4096, 128)) @ mix
    h = x.T @ x / len(x)
    w = (rng.standard_normal((128, 64)) * 0.05).astype(np.float32)
    plain = output_error(w, codebook_rtn(w, name, 32).dequantize(), h)
    compensated = output_error(w, codebook_gptq(w, h, name, 32).dequantize(), h)
    assert compensated < 0.95 * plain


def _logits(model, feeds) -> np.ndarray:
    return ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]


@pytest.mark.parametrize("grid", ["nf4", "fp8"])
def test_the_onnx_model_computes_with_exactly_the_rounded_weights(decoder, grid):
    import onnx_ir as ir

    model, _, calibration, feeds = decoder
    quantizer = Quantizer()
    bits = 8 if grid == "fp8" else 4
    result, outcome = quantizer(model, calibration, Recipe(method="gptq", bits=bits, grid=grid, group_size=32))
    linear = [layer.id for layer in model.layers() if layer.op_type == "MatMul"]
    assert set(outcome.layers) == set(linear)
    assert not any(node.op_type == "MatMulNBits" for node in result.graph)
    formats = {annotation.weight_format(node) for node in result.graph if annotation.layer_id(node) in linear}
    assert formats == {f"codebook-{grid}"}
    expected = model.clone()
    dequantized = {key[0]: layer.dequantize() for key, layer in quantizer._layers.items()}
    for layer in expected.layers():
        if layer.id in dequantized:
            layer.weight.const_value = ir.tensor(dequantized[layer.id], name=layer.weight.name)
    np.testing.assert_allclose(_logits(result, feeds), _logits(expected, feeds), atol=2e-4)
    fp32_bytes = sum(4 * record["params"] for record in outcome.layers.values())
    stored = sum(record["bytes"] for record in outcome.layers.values())
    assert stored < fp32_bytes * (0.16 if bits == 4 else 0.29), "codes and one fp32 scale per 32 weights"
    assert result.weight_bytes() <= model.weight_bytes() - fp32_bytes + stored + 4096, "the file holds the codes"


def test_the_pass_takes_the_formats_width_and_refuses_another(decoder):
    assert QuantizeWeights(grid="fp8").recipe().bits == 8 and QuantizeWeights(grid="nf4").recipe().bits == 4
    with pytest.raises(UsageError, match="grid=nf4 stores 4-bit codes"):
        QuantizeWeights(grid="nf4", bits=8).recipe()
