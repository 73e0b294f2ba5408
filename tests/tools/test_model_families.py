"""The model-family corpus: every family builds locally (no download) with data keyed by its input names, exports
the ways users export it, and runs in ONNX Runtime with the torch module's outputs; trained weights are
learned, cached and read back with ``weights_only``."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bitpass.tools import model_families as mf


def needs(source: str) -> None:
    """Skip when the family's library is not installed (both are test-only dependencies)."""
    if source in ("torchvision", "transformers") and importlib.util.find_spec(source) is None:
        pytest.skip(f"the {source} families need {source} installed")


def _ort(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def test_import_torchvision_gives_the_models_and_restores_register_fake():
    needs("torchvision")
    original = torch.library.register_fake
    torchvision = mf.import_torchvision()
    assert hasattr(torchvision.models, "resnet18")
    assert torch.library.register_fake is original


def test_the_corpus_holds_the_families_the_issue_lists():
    wanted = {"resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
              "convnext_tiny", "vit", "bert", "distilbert", "roberta", "sentence_embedding", "vit_hf", "gpt2",
              "gpt2_lm", "llama", "t5_encoder", "whisper_encoder", "detector"}
    assert wanted <= set(mf.FAMILIES)
    assert {f.output_kind for f in mf.FAMILIES.values()} == set(mf.OUTPUT_KINDS)
    assert any(f.trained and f.output_kind == "logits" for f in mf.FAMILIES.values())
    assert mf.FAMILIES["sentence_embedding"].trained


@pytest.mark.parametrize("name", list(mf.FAMILIES))
def test_every_family_builds_and_exports_with_dynamic_axes(name, tmp_path):
    needs(mf.FAMILIES[name].source)
    built = mf.build(name, "fast")
    assert built.output_kind == mf.FAMILIES[name].output_kind
    for data in (built.calibration, built.evaluation):
        assert set(built.input_names) <= set(data)
        assert len({len(data[n]) for n in built.input_names}) == 1
    path = mf.export(built, mf.EXPORTS["torchscript-17"], tmp_path)
    session = _ort(path)
    assert [i.name for i in session.get_inputs()] == list(built.input_names)
    # another batch size than the example's (2), and a shorter sequence for text: the axes are dynamic
    feeds = {k: v[:3] for k, v in built.inputs_of(built.evaluation).items()}
    if "input_ids" in feeds:
        feeds = {k: np.ascontiguousarray(v[:, :-3]) for k, v in feeds.items()}
    got = session.run(None, feeds)[0]
    want = built.reference_outputs(feeds)
    assert got.shape == want.shape
    assert _relative_error(got, want) < 1e-4
    assert np.ptp(want) > 0, "constant outputs (a zero-initialised head) make every fidelity figure meaningless"


def test_builds_are_seeded(tmp_path):
    a, b = mf.build("detector", "fast", seed=3), mf.build("detector", "fast", seed=3)
    for (name, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(x, y), name
    assert np.array_equal(a.calibration["input"], b.calibration["input"])
    c = mf.build("detector", "fast", seed=4)
    assert not torch.equal(next(iter(a.module.parameters())), next(iter(c.module.parameters())))


@pytest.mark.parametrize("name", ["resnet18", "bert"])
def test_dynamo_exports_at_the_newest_opset_write_external_data_by_default(name, tmp_path):
    needs(mf.FAMILIES[name].source)
    built = mf.build(name, "fast")
    how = mf.EXPORTS[f"dynamo-{mf.DYNAMO_NEWEST}"]
    path = mf.export(built, how, tmp_path)
    assert (tmp_path / f"{path.name}.data").is_file(), "torch.onnx.export's default keeps weights beside the model"
    import onnx

    assert max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
               if o.domain in ("", "ai.onnx")) == mf.DYNAMO_NEWEST
    feeds = {k: v[:3] for k, v in built.inputs_of(built.evaluation).items()}
    assert _relative_error(_ort(path).run(None, feeds)[0], built.reference_outputs(feeds)) < 1e-4


def test_external_data_export_keeps_the_weights_in_the_model_folder(tmp_path):
    needs("torchvision")
    built = mf.build("resnet18", "fast")
    path = mf.export(built, mf.EXPORTS["torchscript-17-external"], tmp_path)
    data = tmp_path / mf.EXTERNAL_DATA_FILE
    assert data.is_file() and data.stat().st_size > 4 * built.parameters * 0.9
    assert path.stat().st_size < data.stat().st_size / 10
    feeds = built.inputs_of({k: v[:2] for k, v in built.evaluation.items()})
    assert _relative_error(_ort(path).run(None, feeds)[0], built.reference_outputs(feeds)) < 1e-4


def test_the_trained_cnn_is_accurate_on_held_out_digits():
    needs("torchvision")
    built = mf.build("resnet18_digits", "fast")
    assert built.trained and built.facts["heldout_accuracy"] >= 0.9
    labels = built.evaluation["labels"]
    logits = built.reference_outputs(built.inputs_of(built.evaluation))
    assert float(np.mean(logits.argmax(1) == labels)) == pytest.approx(built.facts["heldout_accuracy"])
    assert built.evaluation["input"].shape[1:] == (3, 32, 32)
    calib = built.calibration["input"].reshape(len(built.calibration["input"]), -1)
    held = built.evaluation["input"].reshape(len(built.evaluation["input"]), -1)
    assert not (calib[:, None, :] == held[None, :, :]).all(-1).any(), "calibration images are held-out images"


def test_the_sentence_encoder_is_trained_and_outputs_unit_embeddings():
    needs("transformers")
    built = mf.build("sentence_embedding", "fast")
    assert built.trained
    chance = 1 / 32
    assert built.facts["heldout_pair_retrieval"] > 2 * chance
    embeddings = built.reference_outputs(built.inputs_of(built.evaluation))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert (built.evaluation["attention_mask"] == 0).any(), "some held-out samples are padded, as in a real batch"


def test_trained_weights_are_cached_by_key_and_read_back_with_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path))
    calls = []

    def train(module):
        calls.append(1)
        with torch.no_grad():
            module.weight.fill_(0.5)
        return {"loss": 0.25}

    key = {"family": "toy", "size": "fast", "seed": 0, "data": "abc"}
    first = torch.nn.Linear(3, 2)
    facts = mf.trained_state(first, key, train)
    second = torch.nn.Linear(3, 2)
    again = mf.trained_state(second, key, train)
    assert calls == [1] and facts["loss"] == again["loss"] == 0.25
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    saved = next((tmp_path / "models").glob("toy-fast-*.pt"))
    assert set(torch.load(saved, weights_only=True)) == {"weight", "bias"}
    assert json.loads(saved.with_suffix(".json").read_text()) == {"loss": 0.25}
    mf.trained_state(torch.nn.Linear(3, 2), {**key, "data": "changed"}, train)
    assert calls == [1, 1], "another data digest is another cache entry"


def test_text_corpus_holds_out_whole_files():
    corpus = mf.text_corpus()
    assert corpus.train and corpus.heldout
    assert not set(corpus.train) & set(corpus.heldout)
    assert mf.text_corpus().digest == corpus.digest


def test_byte_encoding_marks_start_end_and_padding():
    ids, mask = mf.encode(b"hi", 6)
    assert ids.tolist() == [mf.CLS, mf.BYTE0 + ord("h"), mf.BYTE0 + ord("i"), mf.SEP, mf.PAD, mf.PAD]
    assert mask.tolist() == [1, 1, 1, 1, 0, 0]
    small, _ = mf.encode(bytes([255]), 4, vocab=100)
    assert small.max() < 100


def test_a_vit_exported_by_dynamo_at_the_newest_opset_compiles_with_the_default_pipeline(tmp_path):
    """At opset 21+, ONNX Runtime's own Q/DQ rewrites make an S8S8 ViT unloadable (a propagated QuantizeLinear's
    output_dtype no longer matches its zero point): without timing, quantize falls back to 7-bit U8S8 and says
    why (with timing, the format search drops the S8S8 candidate the same way)."""
    from bitpass.tools import compile

    built = mf.build("vit", "fast")
    path = mf.export(built, mf.EXPORTS["dynamo-23"], tmp_path / "vit")
    artifact = compile(str(path), tmp_path / "out", calibration=built.calibration, evaluation=built.evaluation,
                       latency=False)
    assert artifact.manifest["metrics"]["quality"]["fidelity"]["top1_agreement"] >= 0.99
    quantization = artifact.manifest["records"]["quantization"]
    assert quantization.get("flavour_fallback", "").startswith("u8s8-reduce-range: ONNX Runtime refused S8S8") \
        or quantization["activation_type"] == "int8", "S8S8, or the fallback and why (ONNX Runtime 1.32 refuses)"


@pytest.mark.parametrize("budget", ["avg-bits=4", "size=0.3x"])
def test_the_detector_whose_heads_share_weights_compiles_mixed_and_joint(tmp_path, budget):
    """One head weight read at every FPN level: packed once however many layers read it, read as the int8 weight
    where another reader quantized it, and its cut graph measured whole where ONNX Runtime refuses it."""
    from bitpass.tools import compile

    built = mf.build("detector", "fast")
    path = mf.export(built, mf.EXPORTS["torchscript-17"], tmp_path / "detector")
    pipeline = "joint" if budget.startswith("size") else "default"
    artifact = compile(str(path), tmp_path / "out", pipeline=pipeline, budget=budget, calibration=built.calibration,
                       evaluation=built.evaluation, latency=False)
    assert artifact.manifest["metrics"]["quality"]["fidelity"]["cosine"] >= 0.99
    assert artifact.manifest["metrics"]["size"]["weight_ratio"] < 0.5
