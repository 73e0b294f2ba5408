"""Layer-input Hessians from ONNX Runtime: the same Gram matrices as the model's inner tensors give, the model
untouched (the session reads a clone written with external data)."""

from __future__ import annotations

import numpy as np

from bitpass.passes import execution
from bitpass.passes.weight_only.hessians import Gram, layer_input_hessians


def test_layer_input_hessians_are_the_gram_matrices_of_the_inner_tensors_and_the_model_is_untouched(decoder):
    model, _, calibration, _ = decoder
    names = [layer.node.inputs[0].name for layer in model.layers() if layer.op_type != "Gather"]
    before = model.to_bytes()
    hessians = layer_input_hessians(model, names, calibration)
    assert model.to_bytes() == before
    expected: dict[str, Gram] = {}
    for values in execution.intermediates(model, calibration, names, batch_size=len(calibration)):
        for name in set(names):
            expected.setdefault(name, Gram(values[name].shape[-1])).add(values[name])
    assert set(hessians) == set(names)
    for name, gram in expected.items():
        np.testing.assert_allclose(hessians[name], gram.value, rtol=1e-5, atol=1e-6)


def test_spilled_arrays_read_back_equal_and_their_folder_goes_with_them():
    import gc

    from bitpass.passes.weight_only.hessians import Renamed, SpilledArrays

    store = SpilledArrays()
    h = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    store[("digest", "x", 128)] = h
    view = Renamed(store, {"layer.a": ("digest", "x", 128), "layer.b": ("digest", "x", 128)})
    np.testing.assert_array_equal(view["layer.b"], h)
    assert view["layer.a"].dtype == np.float32 and "layer.a" in view and view.get("layer.c") is None
    assert sorted(view) == ["layer.a", "layer.b"] and len(store) == 1
    folder = store.folder
    assert folder.is_dir()
    del store, view
    gc.collect()
    assert not folder.exists()


def test_hessians_collected_in_groups_under_a_memory_bound_are_the_same_numbers_as_all_at_once(decoder):
    """Past ``MAX_GRAM_BYTES`` the data runs once per group of tensors whose accumulators fit: every group sees the
    same batches in the same order, so each Hessian is bit for bit the one collected with all the others."""
    from bitpass.passes.weight_only.hessians import gram_groups, iter_layer_input_hessians

    model, _, calibration, _ = decoder
    names = list(dict.fromkeys(layer.node.inputs[0].name for layer in model.layers() if layer.op_type != "Gather"))
    at_once = layer_input_hessians(model, names, calibration, max_bytes=1 << 40)
    one_width = 4 * 64 * 64  # the 64-wide model's attention and MLP-out inputs; its MLP-down input is 256 wide
    groups = gram_groups(model, names, 2 * one_width)
    assert [name for group in groups for name in group] == names and 2 < len(groups) < len(names)
    wide = {name for name in names if at_once[name].shape[0] == 256}
    assert wide and all(len(group) == 1 for group in groups if wide & set(group))
    grouped = list(iter_layer_input_hessians(model, names, calibration, max_bytes=2 * one_width))
    assert [name for name, _ in grouped] == names
    for name, h in grouped:
        assert h.dtype == np.float32
        np.testing.assert_array_equal(h, at_once[name])


def test_the_grouped_collection_writes_the_same_model_as_all_at_once(decoder, monkeypatch):
    """GPTQ with mixed widths by group (Hessians everywhere: salience and rounding) gives the same bytes whether the
    Hessians were collected one tensor at a time or all together."""
    from bitpass.passes.weight_only import hessians as module
    from bitpass.passes.weight_only.quantize import Recipe, quantize_weights

    model, _, calibration, _ = decoder
    recipe = Recipe(method="gptq", bits=3, group_size=32)
    at_once, at_once_record = quantize_weights(model, calibration, recipe)
    monkeypatch.setattr(module, "MAX_GRAM_BYTES", 1)  # every tensor its own group
    grouped, grouped_record = quantize_weights(model, calibration, recipe)
    assert grouped.to_bytes() == at_once.to_bytes()
    assert grouped_record == at_once_record
