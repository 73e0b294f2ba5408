"""KV-cache quantization (KVQuant): calibrate per-channel key scales, and count cache bytes.

Keys have outlier *channels* (a few head dimensions carry large values for every token), so they are
quantized per channel with scales fixed from calibration; values have no such structure and are
quantized per token, with the scale computed when the token enters the cache. The export side
(``bitpass.frontend.decoder.export_decoder(kv_bits=8, key_scales=...)``) builds the graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def key_scales(lm: Any, windows: np.ndarray, bits: int = 8, *, batch: int = 16) -> np.ndarray:
    """Per-channel key scales ``(layers, kv_heads, head_dim)``: the largest |key| seen on the calibration
    windows over the largest code (127 for 8 bits, 7 for 4)."""
    import torch

    top = 2 ** (bits - 1) - 1
    peaks: list[np.ndarray] = []
    windows = np.asarray(windows, np.int64)
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            out = lm(input_ids=torch.from_numpy(windows[start:start + batch]), use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            step = np.stack([layer.keys.abs().amax(dim=(0, 2)).numpy() for layer in cache.layers])
            peaks.append(step)
    peak = np.max(peaks, axis=0)
    return np.maximum(peak / top, 1e-8).astype(np.float32)


def cache_bytes(present: dict[str, np.ndarray]) -> int:
    """Bytes a cache holds (every past tensor, scales included)."""
    return int(sum(array.nbytes for array in present.values()))


def packed_cache_bytes(present: dict[str, np.ndarray], bits: int) -> int:
    """Bytes the same cache would hold with its integer codes packed ``8 // bits`` per byte."""
    total = 0
    for array in present.values():
        total += array.size * bits // 8 if np.issubdtype(array.dtype, np.integer) else array.nbytes
    return int(total)
