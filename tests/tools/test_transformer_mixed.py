"""Issue criterion: on the project's transformer, at an average of 5 weight bits, the mixed-precision
artifact's embeddings keep a cosine of at least 0.99 to the fp32 embeddings (held-out data, no labels)."""

from __future__ import annotations

import torch

from bitpass.tools import compile, zoo


def test_avg_5_bits_keeps_cosine_to_fp32_embeddings(trained_transformer, tmp_path):
    encoder, split = trained_transformer
    name = "x"  # the encoder's forward argument
    with zoo.single_thread():  # sensitivity runs torch: one thread is faster on a shared 2-core machine
        artifact = compile(encoder, tmp_path / "out", example_inputs=(torch.zeros(1, 1, 8, 8),), pipeline="mixed",
                           calibration={name: split.calib_x}, evaluation={name: split.eval_x}, latency=False,
                           overrides={"allocate-bits": {"budget": "avg-bits=5"}})
    summary = artifact.manifest["summary"]
    layers = artifact.manifest["layers"]
    assert summary["layers"] == 9 and all(r["op_type"] == "MatMul" for r in layers)
    assert summary["average_weight_bits"] <= 5.0 + 1e-9
    assert artifact.manifest["records"]["allocation"]["totals"]["avg-bits"] <= 5.0 + 1e-9
    assert artifact.manifest["records"]["sensitivity"]["method"] == "hutchinson"
    # mixed: not one width everywhere, and genuinely below 8 bits on most weights
    widths = {r["bits"]["weight"] for r in layers}
    assert len(widths) > 1 and min(widths) <= 4
    assert artifact.metrics["size"]["weight_ratio"] < 0.25
    fidelity = artifact.metrics["quality"]["fidelity"]
    assert "accuracy" not in artifact.metrics["quality"], "evaluated without labels: fidelity only"
    assert fidelity["cosine"] >= 0.99, fidelity
