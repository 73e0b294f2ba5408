"""from_torch: torch.export + the dynamo exporter, batch axis dynamic, layer ids are module paths."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from bitpass.frontend import from_torch


def test_cnn_export_matches_torch_and_keeps_module_paths_as_layer_ids(cnn_model, trained_cnn, digits_split):
    assert [layer.id for layer in cnn_model.layers()] == ["0", "3", "7", "11", "13"]
    assert cnn_model.torch_module is trained_cnn
    x = digits_split.eval_x[:7]
    session = ort.InferenceSession(cnn_model.to_bytes(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = trained_cnn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_named_submodules_give_readable_layer_ids():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(6, 5)
            self.head = torch.nn.Linear(5, 2)

        def forward(self, x):
            return self.head(torch.relu(self.encoder(x)))

    model = from_torch(Net(), (torch.zeros(3, 6),))
    assert sorted(layer.id for layer in model.layers()) == ["encoder", "head"]
    assert model.inputs[0].shape[0] == "batch"
