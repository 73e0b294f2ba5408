"""Issue criterion: pruning keeps outputs finite and shapes consistent on every model in the test suite
(the digits CNN, MLP and transformer), for every kind of pruning, and the graph stays valid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitpass.frontend import Model, from_arrays, from_proto, from_torch
from bitpass.passes.infra import PassContext
from bitpass.passes.instruments import verify
from bitpass.plugins.registry import default_registry

PRUNINGS = [
    "prune(method=magnitude,sparsity=0.5)",
    "prune(method=wanda,sparsity=0.5,allocation=global)",
    "prune(method=gblm,sparsity=0.5,allocation=ecoflap)",
    "prune(method=wanda,pattern=2:4)",
    "prune-channels(ratio=0.3)",
    "prune-channels(ratio=0.3),recover(epochs=2)",
]


@pytest.fixture(scope="module")
def exported() -> dict[str, Model]:
    """Each torch model's ``from_torch`` export, made once for this file's 18 cases (an export takes seconds)."""
    return {}


def _fresh_export(exported: dict[str, Model], kind: str, module: torch.nn.Module) -> Model:
    """A fresh Model of ``module``'s export (the pruning passes change the model they are given): exported once,
    then rebuilt from its ONNX proto with the same name, digest and torch module, as ``from_torch`` returns it."""
    if kind not in exported:
        exported[kind] = from_torch(module, (torch.zeros(1, 1, 8, 8),))
    first = exported[kind]
    model = from_proto(first.to_proto(), name=first.provenance.name, sha256=first.provenance.sha256, kind="torch")
    model.torch_module = first.torch_module
    return model


@pytest.fixture(params=["cnn", "mlp", "transformer"])
def model_and_data(request, exported, trained_cnn, trained_mlp, trained_transformer, digits_split):
    module = {"cnn": trained_cnn, "mlp": trained_mlp, "transformer": trained_transformer[0]}[request.param]
    model = _fresh_export(exported, request.param, module)
    name = model.inputs[0].name
    calib = {name: digits_split.calib_x} | ({"labels": digits_split.calib_y} if request.param != "transformer" else {})
    return model, from_arrays(calib, model.inputs), from_arrays({name: digits_split.eval_x[:64]}, model.inputs)


@pytest.mark.parametrize("spec", PRUNINGS)
def test_pruning_keeps_outputs_finite_and_shapes_consistent(model_and_data, spec, outputs):
    model, calib, evaluation = model_and_data
    before = outputs(model, evaluation)
    registry = default_registry()
    pipeline = registry.pipeline(f"fold-constants,eliminate-dead-nodes,fuse,{spec}")
    pruned = pipeline.run(model, PassContext(calibration=calib, seed=0))
    verify(pruned)  # ONNX checker, shape inference, annotation schema
    after = outputs(pruned, evaluation)
    assert after.shape == before.shape
    assert np.isfinite(after).all()
    assert not np.allclose(after, before), "pruning changed nothing"
