"""Shared fixtures: the project's own small models, trained once per test session on real data."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from bitpass.frontend import Model, from_torch
from bitpass.tools import zoo


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """Every compile calls ``gc.collect()`` (the API releases its sessions before a measuring child starts); in the
    suite's process that walks every object torch, TVM, transformers and the test modules made, about 0.6 s a
    compile, minutes over the suite. So what is alive when a test module starts (imports, session fixtures) is
    frozen out of the collector, which then walks only what the module makes. Cyclic garbage of earlier modules is
    collected first, so it is not frozen: nothing a module drops is kept."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run torch on one thread: the models are tiny, and the test machine's two cores are shared.
    Function scope, so the session-scoped trained models are built before it applies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_split() -> zoo.Split:
    return zoo.digits_split()


@pytest.fixture(scope="session")
def trained_cnn() -> torch.nn.Module:
    """The project's digits CNN, trained (seeded) on the training split."""
    module, _ = zoo.trained_digits_cnn()
    return module


@pytest.fixture(scope="session")
def trained_mlp() -> torch.nn.Module:
    module, _ = zoo.trained_digits_mlp()
    return module


@pytest.fixture(scope="session")
def trained_transformer() -> tuple[torch.nn.Module, zoo.Split]:
    """The project's digits transformer encoder (embeddings out, no labels needed) and its data split."""
    return zoo.trained_digits_transformer()


@pytest.fixture(scope="session")
def _tiny_gpt2_64():
    """A 64-wide, 2-layer GPT-2 (seed 0, random weights) exported with its KV cache once per session: the export
    takes 5-9 s and eight test modules use this same decoder. Tests take ``tiny_gpt2_64`` (a copy)."""
    from bitpass.frontend.decoder import export_decoder
    from bitpass.tools import decoders

    return export_decoder(decoders.tiny_gpt2(width=64))


@pytest.fixture(scope="module")
def tiny_gpt2_64(_tiny_gpt2_64):
    """(Model, DecoderSpec) of the session's tiny GPT-2: a module's own copy of the graph, sharing the weights
    (immutable by convention) and the transformers module (``model.torch_module``, not to be changed)."""
    model, spec = _tiny_gpt2_64
    return model.clone(), spec


@pytest.fixture(scope="session")
def _cnn_proto(trained_cnn):
    return from_torch(trained_cnn, (torch.zeros(1, 1, 8, 8),)).to_proto()


@pytest.fixture(scope="session")
def _mlp_proto(trained_mlp):
    return from_torch(trained_mlp, (torch.zeros(1, 1, 8, 8),)).to_proto()


@pytest.fixture
def cnn_model(_cnn_proto, trained_cnn) -> Model:
    """A fresh bitpass Model of the trained CNN (exported once, copied per test)."""
    from bitpass.frontend import from_proto

    model = from_proto(_cnn_proto, name="digits_cnn", kind="torch")
    model.torch_module = trained_cnn
    return model


@pytest.fixture
def mlp_model(_mlp_proto, trained_mlp) -> Model:
    from bitpass.frontend import from_proto

    model = from_proto(_mlp_proto, name="digits_mlp", kind="torch")
    model.torch_module = trained_mlp
    return model


@pytest.fixture
def calib_arrays(digits_split) -> dict[str, np.ndarray]:
    return {"input": digits_split.calib_x}


@pytest.fixture
def eval_arrays(digits_split) -> dict[str, np.ndarray]:
    return {"input": digits_split.eval_x, "labels": digits_split.eval_y}


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory, _cnn_proto, digits_split):
    """The trained CNN as model.onnx beside calib.npz and eval.npz (held-out, labelled)."""
    import onnx

    folder = tmp_path_factory.mktemp("digits")
    onnx.save(_cnn_proto, folder / "model.onnx")
    np.savez(folder / "calib.npz", input=digits_split.calib_x)
    np.savez(folder / "eval.npz", input=digits_split.eval_x, labels=digits_split.eval_y)
    return folder
