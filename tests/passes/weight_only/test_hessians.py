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
