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


class _BranchOnData(torch.nn.Module):
    """A data-dependent branch: torch.export refuses to guard on it, TorchScript traces the branch taken."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x) * 2
        return self.linear(x)


def test_a_module_torch_export_cannot_trace_is_exported_by_torchscript_and_says_so():
    from bitpass.backends.base import reference_runner

    torch.manual_seed(0)
    module = _BranchOnData().eval()
    x = torch.ones(2, 8)
    model = from_torch(module, (x,))
    assert model.torch_module is None, "TorchScript node names are not module paths"
    assert any("exported with the TorchScript exporter" in note and "\x1b" not in note
               for note in model.provenance.notes)
    assert model.inputs[0].name == "x" and model.inputs[0].shape[0] == "batch"
    xs = np.ones((3, 8), np.float32)
    got = reference_runner(model).run({"x": xs})[0]
    np.testing.assert_allclose(got, module(torch.from_numpy(xs)).detach().numpy(), rtol=1e-5, atol=1e-5)
