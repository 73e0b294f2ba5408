"""The latency probe: every timed layer gets fp32 and compute-format figures, measured once and cached."""

from __future__ import annotations

import json

from bitpass.backends.onnxruntime.latency import FP32, measure
from bitpass.passes.allocation.formats import variants_to_measure


def test_probe_times_every_layer_and_caches_the_figures(cnn_model, tmp_path):
    widths = {layer.id: (32, 8, 4) for layer in cnn_model.layers()}
    wanted = variants_to_measure(cnn_model.layers(), widths)
    cache = tmp_path / "latency.json"
    first = measure(cnn_model, wanted, batches=(1, 4), cache=cache)
    assert set(first) == {layer.id for layer in cnn_model.layers()}
    for layer_id, row in first.items():
        assert FP32 in row and all(row[FP32][b] > 0 for b in (1, 4))
        assert set(row) == {FP32, *wanted[layer_id]}, layer_id  # every compute format could be built and run
    stored = json.loads(cache.read_text())
    assert len(stored) == sum(len(row) for row in first.values()) * 2
    again = measure(cnn_model, wanted, batches=(1, 4), cache=cache)
    assert again == first  # from the cache, not re-measured


def test_untimed_layers_are_left_out(cnn_model, tmp_path):
    assert measure(cnn_model, {}, cache=tmp_path / "c.json") == {}
