"""The project's decoder LMs: the stdlib byte corpus, training with a cache, sized random-init models."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from bitpass.frontend import BitpassError
from bitpass.tools import decoders


@pytest.fixture(scope="module")
def corpus():
    return decoders.text_corpus()


def test_the_corpus_is_split_by_file_and_held_out_text_is_never_trained_on(corpus):
    assert corpus.train.size > 3_000_000 and corpus.heldout.size > 300_000
    heldout_file = (corpus.root / "ipaddress.py").read_bytes()
    assert heldout_file[1000:1200] in corpus.heldout.tobytes()
    assert heldout_file[1000:1200] not in corpus.train.tobytes()
    assert set(decoders.HELDOUT_FILES) <= set(decoders.CORPUS_FILES)


def test_windows_are_reproducible_and_drawn_from_their_split(corpus):
    calib, evaluation = corpus.calibration(65, 8), corpus.evaluation(65, 8)
    np.testing.assert_array_equal(calib, corpus.calibration(65, 8))
    assert calib.shape == evaluation.shape == (8, 65) and calib.dtype == np.int64
    assert bytes(evaluation[3].astype(np.uint8)) in corpus.heldout.tobytes()


def test_a_folder_without_the_stdlib_files_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(BitpassError, match="text_corpus\\(root=...\\)"):
        decoders.text_corpus(tmp_path)


def test_the_cache_key_follows_recipe_seed_and_data():
    recipe = decoders.TINY_RECIPE
    keys = {recipe.key("a"), recipe.key("b"), decoders.ByteLMRecipe(seed=1).key("a"), decoders.DEFAULT_RECIPE.key("a")}
    assert len(keys) == 4


def test_tiny_training_learns_and_is_cached_and_reloaded(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path))
    recipe = decoders.TINY_RECIPE
    windows = corpus.evaluation(recipe.context + 1, 32)
    untrained = decoders.bits_per_byte(decoders.build_byte_lm(recipe), windows)
    assert decoders.cached_byte_lm(recipe, corpus) is None
    trained = decoders.trained_byte_lm(recipe, corpus)
    path = decoders.weights_path(recipe, corpus)
    assert path.is_file() and path.parent == tmp_path / "models"
    assert decoders.bits_per_byte(trained, windows) < untrained - 1.0
    reloaded = decoders.cached_byte_lm(recipe, corpus)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0)


class NotWeights:
    pass


def test_a_cached_file_that_is_not_plain_weights_is_refused_never_unpickled(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPASS_CACHE_DIR", str(tmp_path))
    path = decoders.weights_path(decoders.TINY_RECIPE, corpus)
    path.parent.mkdir(parents=True)
    torch.save({"payload": NotWeights()}, path)
    with pytest.raises(BitpassError, match="delete the file to retrain"):
        decoders.cached_byte_lm(decoders.TINY_RECIPE, corpus)


def test_sized_models_have_the_published_shapes_and_llama_uses_grouped_query_attention():
    llama = decoders.llama_small()
    assert llama.config.num_key_value_heads == 2 and llama.config.num_attention_heads == 4
    assert decoders.GPT2_SIZES["small"] == {"n_embd": 768, "n_layer": 12, "n_head": 12}
    with pytest.raises(BitpassError, match="unknown GPT-2 size 'huge'"):
        decoders.gpt2_sized("huge")


def test_the_real_weight_lm_when_cached_predicts_held_out_python_well(corpus):
    """Heavy part: runs only where ``python -m bitpass.tools.decoders`` has trained and cached the LM."""
    model = decoders.cached_byte_lm(decoders.DEFAULT_RECIPE, corpus)
    if model is None:
        pytest.skip("the real-weight byte LM is not cached here: python -m bitpass.tools.decoders trains it")
    assert decoders.bits_per_byte(model, corpus.evaluation(129, 64)) < 2.6
