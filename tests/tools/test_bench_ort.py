"""The ORT comparison benchmark end to end on one tiny model: real exports, ORT's real quantizers, a real
bitpass compile, real timing in a fresh process; the table has every column and sane figures.

The ``avg-bits=4`` variant is left out here only for time (its compile runs the mixed-precision search);
it goes through the same code path as ``bitpass default``."""

from __future__ import annotations

import json

import pytest

from bitpass.tools import bench_ort


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    variants = (bench_ort.FP32, *bench_ort.ORT_INT8, bench_ort.BITPASS_DEFAULT)
    return bench_ort.bench_model("resnet18", size="fast", batches=(1,), threads=2, rounds=2, cache=cache,
                                 say=lambda _m: None, variants=variants)


def test_every_variant_is_made_checked_and_timed(result):
    assert [r.variant for r in result.rows] == [bench_ort.FP32, *bench_ort.ORT_INT8, bench_ort.BITPASS_DEFAULT]
    for row in result.rows:
        assert row.error is None, f"{row.variant}: {row.error}"
        assert row.speedup[1] > 0 and row.seconds[1] > 0
        low, high = row.speedup_band[1]
        assert 0 < low <= high
        assert 0.0 <= row.top1_agreement <= 1.0
        assert -1.0 <= row.cosine <= 1.0 + 1e-9
        assert row.accuracy is None  # random init: no labels
        assert row.bytes_ratio > 0 and row.build_seconds >= 0
    fp32 = result.row(bench_ort.FP32)
    assert fp32.top1_agreement == 1.0 and fp32.bytes_ratio == 1.0
    assert result.row("ORT U8S8").bytes_ratio < 0.5  # int8 weights: about a quarter of the fp32 file


def test_bitpass_rows_say_what_the_manifest_chose(result):
    row = result.row(bench_ort.BITPASS_DEFAULT)
    assert row.manifest is not None and row.format
    search = row.manifest["records"]["quantization"].get("search")
    if search:
        assert search["chosen"] in row.format and search["flavour"] in row.format


def test_the_table_has_every_column_in_console_markdown_and_json(result, tmp_path):
    names = bench_ort.columns((1,))
    assert {"ms b1", "x fp32 b1", "top-1 agree", "accuracy", "cosine", "bytes x fp32"} <= set(names)
    lines = bench_ort.table([result], (1,)).splitlines()
    assert lines[0].split() == " ".join(names).split()
    assert len(lines) == 1 + len(result.rows)
    markdown = bench_ort.markdown([result], (1,)).splitlines()
    assert markdown[0] == "| " + " | ".join(names) + " |"
    assert all(line.count("|") == len(names) + 1 for line in markdown)
    data = json.loads(json.dumps(bench_ort.to_json([result], {}), default=bench_ort._jsonable))
    assert data["results"][0]["checks"]["1"]["fastest_ort"] in (bench_ort.FP32, *bench_ort.ORT_INT8)


def test_fidelity_of_identical_and_of_swapped_logits():
    import numpy as np

    logits = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    same = bench_ort.fidelity(logits, logits, np.array([0, 1]))
    assert same == {"top1_agreement": 1.0, "cosine": pytest.approx(1.0), "min_cosine": pytest.approx(1.0),
                    "accuracy": 0.5}
    swapped = bench_ort.fidelity(logits[:, ::-1], logits, None)
    assert swapped["top1_agreement"] == 0.0 and swapped["cosine"] < 0.5 and swapped["accuracy"] is None


def test_transformer_families_get_the_transformer_variants_and_every_bitpass_variant_has_options():
    assert bench_ort.variants_for("sentence_embedding") == bench_ort.TRANSFORMER_VARIANTS
    assert bench_ort.variants_for("resnet18") == bench_ort.VARIANTS
    for variant in (*bench_ort.VARIANTS, *bench_ort.TRANSFORMER_VARIANTS):
        assert variant in bench_ort.ORT_VARIANTS or variant in bench_ort.BITPASS_OPTIONS, variant


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    variants = (bench_ort.FP32, bench_ort.ORT_OPTIMIZED, bench_ort.ORT_NNCF)
    return bench_ort.bench_model("sentence_embedding", size="fast", batches=(1,), threads=2, rounds=2,
                                 cache=tmp_path_factory.mktemp("cache"), say=lambda _m: None, variants=variants,
                                 keep=tmp_path_factory.mktemp("variants"))


def test_transformer_rows_compare_embeddings_by_cosine_and_the_nncf_style_scope_is_matmul_only(transformer):
    import onnx

    for row in transformer.rows:
        assert row.error is None, f"{row.variant}: {row.error}"
        assert row.top1_agreement is None  # an embedding's argmax means nothing
        assert row.min_cosine <= row.cosine <= 1.0 + 1e-9 and row.speedup[1] > 0
    assert transformer.row(bench_ort.ORT_OPTIMIZED).min_cosine > 0.9999  # fp32 fusions: same function
    nncf = onnx.load(transformer.row(bench_ort.ORT_NNCF).path)
    producers = {out: n.op_type for n in nncf.graph.node for out in n.output}
    fed = {n.op_type for n in nncf.graph.node if any(producers.get(i) == "DequantizeLinear" for i in n.input)}
    assert fed and fed <= {"MatMul", "Gemm"}, fed


def test_bitpass_artifacts_are_timed_with_the_session_options_they_ship(tmp_path):
    """What ``session.json`` turns off (a timed choice of ORT's load-time fusions) is turned off when timing."""
    shipped = tmp_path / "bitpass_default"
    shipped.mkdir()
    (shipped / "model.onnx").write_bytes(b"")
    (shipped / "session.json").write_text(json.dumps({"disabled_optimizers": ["SkipLayerNormFusion"]}))
    plain = tmp_path / "bitpass_packed"
    plain.mkdir()
    (plain / "session.json").write_text(json.dumps({"disabled_optimizers": []}))
    ort_dir = tmp_path / "ORT_dynamic"
    ort_dir.mkdir()
    (ort_dir / "session.json").write_text(json.dumps({"disabled_optimizers": ["SkipLayerNormFusion"]}))
    rows = [bench_ort.Row("m", "bitpass default", str(shipped / "model.onnx")),
            bench_ort.Row("m", "bitpass packed", str(plain / "model.onnx")),
            bench_ort.Row("m", "ORT dynamic", str(ort_dir / "model.onnx"))]
    assert bench_ort.shipped_session_options(rows) == {"bitpass default": ["SkipLayerNormFusion"]}


def test_a_bitpass_row_carries_its_session_graph_and_equal_graphs_are_reported_as_equal_speed(result):
    default = result.row(bench_ort.BITPASS_DEFAULT)
    assert default.session_graph is not None and all(r.session_graph is None for r in result.rows
                                                     if not r.variant.startswith("bitpass"))
    same = bench_ort.Row(result.model, bench_ort.BITPASS_LOW, session_graph=default.session_graph, bytes_ratio=0.14)
    other = bench_ort.Row(result.model, bench_ort.BITPASS_LOW, session_graph="another graph", bytes_ratio=0.14)
    assert bench_ort.same_session_graph(same, default) is True
    assert bench_ort.same_session_graph(other, default) is False
    assert bench_ort.same_session_graph(bench_ort.Row(result.model, bench_ort.BITPASS_LOW), default) is None
    check = {"fastest_ort": bench_ort.FP32, "low_vs_default": 0.97, "low_same_graph_as_default": True}
    both = bench_ort.ModelResult(result.model, "fast", "", [default, same], {1: check})
    assert "runs bitpass default's ONNX Runtime session graph" in bench_ort.checks_lines([both])[0]


def test_a_mixed_rows_format_says_what_allocation_chose_before_the_search():
    manifest = {"records": {"quantization": {"search": {"chosen": "merged-u8s8", "flavour": "u8s8"},
                                             "layers": {"a": {"result": "int8-qdq"}, "b": {"result": "int8-qdq"}}},
                            "allocation": {"int8_flavour": "qdq-u8",
                                           "formats": {"a": {"format": "packed"}, "b": {"format": "qdq"}}}}}
    assert bench_ort.bitpass_format(manifest) == "merged-u8s8 u8s8; int8-qdq:2; allocated qdq-u8 packed:1 qdq:1"
