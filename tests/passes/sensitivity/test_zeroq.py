"""ZeroQ data synthesis: BatchNorm statistics of the synthesised batch match the running ones."""

from __future__ import annotations

import pytest
import torch

from bitpass.frontend import UsageError, from_arrays
from bitpass.passes.infra import PassContext
from bitpass.passes.pipeline import Pipeline
from bitpass.passes.sensitivity.passes import Sensitivity
from bitpass.passes.sensitivity.zeroq import SynthesizeData, bn_statistics_loss


def test_synthesized_data_matches_batch_norm_statistics(cnn_model):
    ctx = PassContext(seed=5)
    result = SynthesizeData(samples=32, iterations=50).run(cnn_model, ctx)
    assert not result.modified
    record = ctx.records["synthesize-data"]
    assert record["final_bn_loss"] * 10 < record["initial_bn_loss"]
    data = ctx.calibration
    assert data is not None and data.source == "zeroq" and data.inputs["input"].shape == (32, 1, 8, 8)
    assert record["data_sha256"] == data.sha256
    with torch.no_grad():
        noise = bn_statistics_loss(cnn_model.torch_module, torch.randn(32, 1, 8, 8))
        synthetic = bn_statistics_loss(cnn_model.torch_module, torch.from_numpy(data.inputs["input"]))
    assert float(synthetic) * 10 < float(noise)
    assert cnn_model.torch_module.training is False


def test_data_free_pipeline_feeds_sensitivity(cnn_model):
    ctx = PassContext()
    Pipeline([SynthesizeData(samples=32, iterations=30), Sensitivity(method="fisher")]).run(cnn_model, ctx)
    assert ctx.records["sensitivity"]["data_source"] == "zeroq"
    assert set(ctx.analyses.require("sensitivity")) == {layer.id for layer in cnn_model.layers()}


def test_given_calibration_data_is_kept(cnn_model, calib_arrays):
    calib = from_arrays(calib_arrays, cnn_model.inputs)
    ctx = PassContext(calibration=calib)
    SynthesizeData(iterations=5).run(cnn_model, ctx)
    assert ctx.calibration is calib and "skipped" in ctx.records["synthesize-data"]


def test_clear_errors_without_torch_module_or_batch_norm_leave_no_data_behind(cnn_model):
    ctx = PassContext()
    cnn_model.torch_module = None
    with pytest.raises(UsageError, match="torch module"):
        SynthesizeData().run(cnn_model, ctx)
    cnn_model.torch_module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))  # no BatchNorm
    with pytest.raises(UsageError, match="BatchNorm"):
        SynthesizeData(iterations=5).run(cnn_model, ctx)
    assert ctx.calibration is None and "synthesize-data" not in ctx.records  # nothing half-made is left
