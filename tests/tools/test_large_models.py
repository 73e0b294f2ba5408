"""Models over protobuf's 2 GiB, end to end: the limit is lowered (``SINGLE_PROTO_MAX_WEIGHT_BYTES``) so that a tiny
GPT-2 takes the path a 3 GB model takes: imported from external data, every ONNX Runtime session and onnx check made
by path, the artifact written with its weights beside ``model.onnx``; and the artifact is the one the in-memory path
writes, byte for byte in its weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from bitpass.backends import measure
from bitpass.frontend import model as model_module
from bitpass.tools import api, compile, verify

RNG = np.random.default_rng(1)
CALIB = RNG.integers(0, 256, (16, 32))
EVAL = RNG.integers(0, 256, (6, 32))
#: under every weight of the tiny model: each model, sub-model and probe takes the external-data path
LOWERED = 1024


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory, tiny_gpt2_64):
    folder = tmp_path_factory.mktemp("large")
    model, _ = tiny_gpt2_64
    model.save_external(folder / "lm.onnx")  # as a >2 GiB export comes: the weights in lm.onnx.data
    np.savez(folder / "calib.npz", input_ids=CALIB)
    np.savez(folder / "eval.npz", input_ids=EVAL)
    return folder


def _compile(folder, out, *, lowered: bool, **options):
    with pytest.MonkeyPatch.context() as patch:
        if lowered:  # a model past 2 GiB, measured holding one ONNX Runtime session at a time
            patch.setattr(model_module, "SINGLE_PROTO_MAX_WEIGHT_BYTES", LOWERED)
            patch.setattr(api, "ONE_SESSION_AT_A_TIME_BYTES", LOWERED)
        return compile(folder / "lm.onnx", out, calibration=folder / "calib.npz", evaluation=folder / "eval.npz",
                       **options)


def _weights(path):
    """Every initializer of the model at ``path`` (external data loaded), by name, as bytes."""
    proto = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer}, proto


@pytest.mark.parametrize("options", [{"pipeline": "optimize"}, {"budget": "avg-bits=4"}],
                         ids=["optimize", "avg-bits=4"])
def test_a_model_past_the_protobuf_limit_compiles_to_the_same_artifact_with_external_data(decoder_folder, tmp_path,
                                                                                         options):
    big = _compile(decoder_folder, tmp_path / "big", lowered=True, **options)
    small = _compile(decoder_folder, tmp_path / "small", lowered=False, **options)
    assert (big.path / "model.onnx.data").is_file() and not (small.path / "model.onnx.data").exists()
    assert "model.onnx.data" in big.manifest["files"]
    big_weights, big_proto = _weights(big.path / "model.onnx")
    small_weights, small_proto = _weights(small.path / "model.onnx")
    assert big_weights == small_weights
    assert [(n.op_type, list(n.input)) for n in big_proto.graph.node] == \
        [(n.op_type, list(n.input)) for n in small_proto.graph.node]
    assert big.manifest["records"]["quality_gate"]["passed"]
    assert big.metrics["quality"]["lm"] == small.metrics["quality"]["lm"]
    assert big.metrics["memory"]["artifact"]["session_rss"] > 0
    assert big.metrics["latency"]["decode"]["in_turn"] and "in_turn" not in small.metrics["latency"]["decode"]
    assert big.metrics["latency"]["decode"]["artifact_tokens_per_s"] > 0
    assert big.manifest["records"]["resources"]["compile_peak_rss_mb"] > 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "SINGLE_PROTO_MAX_WEIGHT_BYTES", LOWERED)
        checks = verify(big.path, decoder_folder / "eval.npz")
    assert all(c.ok for c in checks), checks


def test_the_external_data_artifact_is_byte_identical_across_compiles(decoder_folder, tmp_path):
    first = _compile(decoder_folder, tmp_path / "a", lowered=True, pipeline="optimize", latency=False)
    second = _compile(decoder_folder, tmp_path / "b", lowered=True, pipeline="optimize", latency=False)
    for name in ("model.onnx", "model.onnx.data", "session.json"):
        assert hashlib.sha256((first.path / name).read_bytes()).digest() == \
            hashlib.sha256((second.path / name).read_bytes()).digest(), name
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["files"]["model.onnx.data"]["bytes"] == (first.path / "model.onnx.data").stat().st_size


def test_a_cnn_past_the_protobuf_limit_gets_int8_through_the_default_pipeline(trained_cnn, digits_split, tmp_path):
    """The int8 path (calibration, ORT's quantizer, the format search's candidates) on files with external data."""
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "SINGLE_PROTO_MAX_WEIGHT_BYTES", LOWERED)
        artifact = compile(trained_cnn, tmp_path / "out", example_inputs=(torch.zeros(1, 1, 8, 8),),
                           calibration=digits_split.calib_x[:128], evaluation=digits_split.eval_x[:64], latency=False)
    assert (artifact.path / "model.onnx.data").is_file()
    assert artifact.manifest["records"]["quality_gate"]["passed"]
    assert any(r["bits"]["weight"] == 8 for r in artifact.manifest["layers"])


@pytest.mark.parametrize("options", [{"pipeline": "optimize"},
                                     {"budget": "avg-bits=4", "tolerance": "kl=0.00005", "allow_quality_loss": True}],
                         ids=["optimize", "avg-bits=4-repaired"])
def test_a_large_language_model_measured_in_turn_gets_the_same_artifact_and_gate(decoder_folder, tmp_path, options):
    """Past ``ONE_SESSION_AT_A_TIME_BYTES`` a language model is measured holding one session at a time, its fp32
    reference's KV-cache outputs dropped before the artifact is emitted: the artifact's files, the quality gate
    (a repair forced by a tight bound included: its ranking and the layers put back) and the quality figures are
    the ones the default path gives. Its weights paged out to a scratch file before and after the passes
    (``PAGE_OUT_BYTES``; the passes, GPTQ's layer-input collection included, read them mapped) change none of it: the emitted model's ranking and the repair re-run from the paged model before quantizing.
    Nor does gathering the predicted logits in files (``measure.SPILL_BYTES``) instead of memory.
    (An earlier spill with external-data tensors changed the repair's ranking.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "ONE_SESSION_AT_A_TIME_BYTES", LOWERED)
        patch.setattr(api, "PAGE_OUT_BYTES", LOWERED)
        patch.setattr(measure, "SPILL_BYTES", 1024)  # the logits gathered in files, read back memory-mapped
        in_turn = compile(decoder_folder / "lm.onnx", tmp_path / "in-turn", calibration=decoder_folder / "calib.npz",
                          evaluation=decoder_folder / "eval.npz", latency=False, **options)
    held = compile(decoder_folder / "lm.onnx", tmp_path / "held", calibration=decoder_folder / "calib.npz",
                   evaluation=decoder_folder / "eval.npz", latency=False, **options)
    for name in ("model.onnx", "session.json"):
        assert (in_turn.path / name).read_bytes() == (held.path / name).read_bytes(), name
    gates = [a.manifest["records"]["quality_gate"] for a in (in_turn, held)]
    assert [{k: g.get(k) for k in ("passed", "final", "fp32_layers", "ranking")} for g in gates][0] == \
        [{k: g.get(k) for k in ("passed", "final", "fp32_layers", "ranking")} for g in gates][1]
    if "tolerance" in options:
        assert gates[0].get("fp32_layers"), "the tight bound forces a repair"
    assert in_turn.metrics["quality"]["lm"] == held.metrics["quality"]["lm"]
    assert in_turn.manifest["layers"] == held.manifest["layers"]
    resources = [a.manifest["records"]["resources"] for a in (in_turn, held)]
    assert resources[0]["paged_out_mb"] > 0 and "paged_out_mb" not in resources[1]
