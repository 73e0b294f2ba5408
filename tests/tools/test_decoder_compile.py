"""Decoder language models through the front door: compile (ONNX with a KV cache, a user's cache-less export, a
transformers module), token-id data, the weight-only pipeline, LM quality and speed, verify, run --generate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from bitpass.frontend import DataError, UsageError
from bitpass.tools import compile, decoders, verify
from bitpass.tools.cli import main

RNG = np.random.default_rng(0)
CALIB = RNG.integers(0, 256, (16, 32))
EVAL = RNG.integers(0, 256, (6, 32))


@pytest.fixture(scope="module")
def lm():
    return decoders.tiny_gpt2(width=64)


@pytest.fixture(scope="module")
def decoder_onnx(tiny_gpt2_64, tmp_path_factory):
    """The session's export of the same GPT-2 as ``lm`` (same seed and sizes), as a user's file."""
    folder = tmp_path_factory.mktemp("decoder")
    model, _ = tiny_gpt2_64
    model.save(folder / "lm.onnx")
    np.savez(folder / "calib.npz", input_ids=CALIB)
    np.savez(folder / "eval.npz", input_ids=EVAL)
    return folder


@pytest.fixture(scope="module")
def compiled(decoder_onnx):
    return compile(decoder_onnx / "lm.onnx", decoder_onnx / "out", calibration=decoder_onnx / "calib.npz",
                   evaluation=decoder_onnx / "eval.npz")


def test_a_kv_cache_decoder_compiles_weight_only_to_matmulnbits_by_default(compiled):
    manifest = compiled.manifest
    assert manifest["pipeline_name"] == "decoder" and "quantize-weights" in manifest["pipeline"]
    linear = [r for r in manifest["layers"] if r["op_type"] == "MatMul"]
    assert linear and all(r["final_op_type"] == "MatMulNBits" and r["bits"]["weight"] == 4 for r in linear)
    assert manifest["decoder"]["layers"] == 2 and manifest["decoder"]["past"][0] == "past_key_values.0.key"
    assert manifest["records"]["weight_only"]["method"] == "gptq"
    assert compiled.metrics["size"]["weight_ratio"] < 0.3


def test_lm_quality_is_per_token_kl_agreement_and_bits_per_token(compiled):
    lm = compiled.metrics["quality"]["lm"]
    assert lm["tokens"] == EVAL.size and lm["scored_tokens"] == EVAL.shape[0] * (EVAL.shape[1] - 1)
    assert 0 <= lm["kl"] < 0.02 and lm["top1_agreement"] > 0.9
    assert lm["bits_per_token"]["fp32"] == pytest.approx(8.0, abs=0.3)  # random weights: about uniform over bytes
    gate = compiled.manifest["records"]["quality_gate"]
    assert gate["output_kind"] == "lm" and gate["tolerance"]["metric"] == "kl" and gate["passed"]


def test_decode_and_prefill_speed_and_session_memory_are_measured_beside_fp32(compiled):
    latency, memory = compiled.metrics["latency"], compiled.metrics["memory"]
    assert set(latency) == {"decode", "prefill"}
    assert latency["decode"]["tokens"] == 1 and latency["decode"]["past"] == 127  # the model's 128 positions
    assert latency["prefill"]["artifact_tokens_per_s"] > 0
    assert memory["artifact"]["session_rss"] > 0 and memory["fp32"]["session_rss"] > 0


def test_verify_rechecks_a_decoder_with_per_token_labels(compiled, decoder_onnx, tmp_path):
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, input_ids=EVAL, labels=EVAL)
    checks = verify(compiled.path, labelled)
    assert all(c.ok for c in checks), checks
    assert {"files", "plan", "gate", "fidelity"} <= {c.name for c in checks}


def test_labels_that_are_not_per_token_are_refused_in_one_line(decoder_onnx, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=EVAL, labels=np.zeros(len(EVAL), np.int64))
    with pytest.raises(DataError, match="per token"):
        compile(decoder_onnx / "lm.onnx", tmp_path / "out", calibration=decoder_onnx / "calib.npz", evaluation=bad,
                latency=False)
    assert not (tmp_path / "out").exists()


def test_a_fractional_avg_bits_budget_mixes_widths_and_others_are_refused(decoder_onnx, tmp_path):
    artifact = compile(decoder_onnx / "lm.onnx", tmp_path / "mixed", calibration=decoder_onnx / "calib.npz",
                       evaluation=decoder_onnx / "eval.npz", budget="avg-bits=3", latency=False)
    record = artifact.manifest["records"]["weight_only"]
    assert record["bits"] == 3.0 and record["average_bits"] == pytest.approx(3.0, abs=0.05)
    with pytest.raises(UsageError, match="avg-bits=N"):
        compile(decoder_onnx / "lm.onnx", tmp_path / "size", calibration=decoder_onnx / "calib.npz",
                budget="size=10KB", latency=False)


def test_a_transformers_causal_lm_module_compiles_with_its_kv_cache(lm, tmp_path):
    artifact = compile(lm, tmp_path / "torch", calibration=CALIB, evaluation=EVAL, latency=False)
    assert artifact.manifest["pipeline_name"] == "decoder"
    assert artifact.manifest["decoder"]["layers"] == 2
    assert any(i["name"] == "past_key_values.1.value" for i in artifact.manifest["inputs"])


def test_a_users_cache_less_torch_onnx_export_is_a_language_model_too(lm, tmp_path):
    ids = torch.zeros(2, 8, dtype=torch.long)
    program = torch.onnx.export(lm, (ids,), kwargs={"use_cache": False}, dynamo=True, input_names=["input_ids"],
                                output_names=["logits"],
                                dynamic_shapes={"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
                                                "use_cache": None})
    program.save(tmp_path / "user.onnx")
    assert [i.name for i in onnx.load(tmp_path / "user.onnx").graph.input] == ["input_ids"]
    artifact = compile(tmp_path / "user.onnx", tmp_path / "out", calibration=CALIB, evaluation=EVAL, latency=False)
    assert artifact.manifest["pipeline_name"] == "decoder"
    assert artifact.manifest["decoder"]["layers"] == 0 and artifact.manifest["decoder"]["max_positions"] == 128
    assert artifact.metrics["quality"]["lm"]["kl"] < 0.02


def test_run_generate_prints_greedy_bytes_and_the_speed(compiled, capsys, lm):
    assert main(["run", str(compiled.path), "--generate", "8", "--prompt", "def f("]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(") and "8 tokens" in out and "tokens/s" in out
    # the same tokens as greedy decoding of the quantized graph's reference (fp32) on almost every step
    with torch.no_grad():
        ids = torch.tensor([list(b"def f(")])
        for _ in range(8):
            ids = torch.cat([ids, lm(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = bytes(ids[0, 6:].tolist()).decode("utf-8", errors="replace")
    generated = out.splitlines()[0][len("def f("):]
    assert sum(a == b for a, b in zip(generated, expected)) >= 6


def test_run_generate_refuses_text_for_a_non_byte_vocabulary_and_bad_ids(compiled, capsys):
    assert main(["run", str(compiled.path), "--generate", "2", "--prompt-ids", "1,999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["run", str(compiled.path), "--prompt", "x", "--input", "a.npz", "-o", "b.npz"]) == 2
    assert main(["run", str(compiled.path)]) == 2


def test_the_manifest_records_a_decoder_spec_generate_can_rebuild(compiled):
    from bitpass.frontend import from_onnx
    from bitpass.frontend.decoder import DecoderSpec, spec_from_model

    spec = spec_from_model(from_onnx(compiled.path / "model.onnx"))
    assert spec == DecoderSpec.from_json(json.loads(json.dumps(compiled.manifest["decoder"])))
