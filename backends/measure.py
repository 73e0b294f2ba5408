"""Measure an artifact against its fp32 reference: quality, size and latency, in one run.

Quality is classification accuracy when the data has labels, and always the
fidelity to the reference outputs (top-1 agreement, cosine, max abs error).
Latency alternates the variants inside one process and takes medians, because
ONNX Runtime timings drift within a process (NOTES.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from dataclasses import asdict, dataclass

import numpy as np

from bitpass.backends.base import Runner
from bitpass.frontend import Dataset
from bitpass.frontend.errors import DataError

EVAL_BATCH = 256


def predict(runner: Runner, data: Dataset, batch_size: int = EVAL_BATCH, count: int | None = None) -> list[np.ndarray]:
    """All outputs of ``runner`` over ``data`` (only the first ``count`` when given: ``Runner.run_first``),
    concatenated along the first axis."""
    parts: list[list[np.ndarray | None]] = []
    for feeds in data.batches(batch_size):
        parts.append(list(runner.run(feeds) if count is None else runner.run_first(feeds, count)))
    outputs = []
    for i in range(len(parts[0])):  # output by output, each batch's piece dropped once joined: not twice the memory
        outputs.append(np.concatenate([p[i] for p in parts]))
        for p in parts:
            p[i] = None
    return outputs


def accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output against integer class labels (one per sample)."""
    logits = outputs[0].reshape(len(outputs[0]), -1)
    labels = np.asarray(labels)
    if labels.ndim > 1 and labels.size == len(labels):
        labels = labels.reshape(-1)
    if labels.ndim != 1 or len(labels) != len(logits):
        raise DataError(f"'labels' has shape {labels.shape}: accuracy needs one class index per sample "
                        f"({len(logits)},); without labels, fidelity to fp32 is measured")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.isfinite(labels)) \
                or not np.all(labels == np.round(labels)):
            raise DataError(f"'labels' must be integer class indices, not {labels.dtype} values")
        labels = labels.astype(np.int64)
    classes = logits.shape[1]
    if classes < 2 or labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"'labels' range from {labels.min()} to {labels.max()}, but the model's first output has "
                        f"{classes} classes per sample: labels must be class indices 0..{classes - 1}")
    return float((logits.argmax(axis=1) == labels).mean())


@dataclass(frozen=True)
class Fidelity:
    """How closely the artifact's first output follows the reference's."""

    top1_agreement: float
    cosine: float
    max_abs_error: float


#: float64 elements a chunk of rows holds while cosines are computed (a 124 M GPT-2's logits on 32 windows of 64
#: tokens are 103 M floats: whole, their float64 copies and products took 2.5 GB)
_CHUNK_ELEMENTS = 1 << 22


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Each sample's cosine between two outputs (samples on axis 0, the rest flattened), in float64.

    Each row is scaled by its own largest magnitude first, so outputs of any scale (1e-9 logits
    included) score what they should; two all-zero rows count as identical, one as orthogonal.
    Rows are taken a few at a time (``_CHUNK_ELEMENTS``): the same figures, bounded memory."""
    ref_rows = reference.reshape(len(reference), -1)
    got_rows = candidate.reshape(len(candidate), -1)
    step = max(1, _CHUNK_ELEMENTS // max(ref_rows.shape[1], 1))
    parts = []
    for start in range(0, len(ref_rows), step):
        ref, got = _unit_rows(ref_rows[start:start + step]), _unit_rows(got_rows[start:start + step])
        ref_zero, got_zero = ~ref.any(axis=1), ~got.any(axis=1)
        result = np.sum(ref * got, axis=1)
        result[ref_zero & got_zero] = 1.0
        result[ref_zero ^ got_zero] = 0.0
        parts.append(result)
    return np.clip(np.concatenate(parts) if parts else np.zeros(0), -1.0, 1.0)


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The largest absolute difference, taken a few samples at a time (no full-size temporaries)."""
    if not reference.size:
        return 0.0
    ref_rows = reference.reshape(len(reference), -1)
    got_rows = candidate.reshape(len(candidate), -1)
    step = max(1, _CHUNK_ELEMENTS // max(ref_rows.shape[1], 1))
    return max(float(np.max(np.abs(ref_rows[i:i + step] - got_rows[i:i + step])))
               for i in range(0, len(ref_rows), step))


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    peak = np.max(np.abs(rows), axis=1, keepdims=True)
    scaled = np.divide(rows, peak, out=np.zeros_like(rows), where=peak > 0)
    norm = np.linalg.norm(scaled, axis=1, keepdims=True)
    return np.divide(scaled, norm, out=np.zeros_like(scaled), where=norm > 0)


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Fidelity:
    ref = reference[0].reshape(len(reference[0]), -1).astype(np.float64)
    got = candidate[0].reshape(len(candidate[0]), -1).astype(np.float64)
    agreement = float((ref.argmax(1) == got.argmax(1)).mean()) if ref.shape[1] > 1 else 1.0
    cosine = float(np.mean(cosines(ref, got)))
    return Fidelity(agreement, cosine, float(np.max(np.abs(ref - got))))


def quality(reference: Runner, artifact: Runner, data: Dataset, *, reference_outputs: list[np.ndarray] | None = None,
            artifact_outputs: list[np.ndarray] | None = None) -> dict:
    """Accuracy of both (if labelled) and fidelity of the artifact to the reference; outputs already predicted on
    ``data`` (by the quality gate) are taken as given instead of running the models again."""
    ref_out = reference_outputs if reference_outputs is not None else predict(reference, data)
    art_out = artifact_outputs if artifact_outputs is not None else predict(artifact, data)
    result: dict = {"samples": len(data), "fidelity": asdict(fidelity(ref_out, art_out))}
    if data.labels is not None:
        ref_acc, art_acc = accuracy(ref_out, data.labels), accuracy(art_out, data.labels)
        result["accuracy"] = {"fp32": ref_acc, "artifact": art_acc, "drop_points": 100 * (ref_acc - art_acc)}
    return result


def batch_of(data: Dataset, size: int) -> dict[str, np.ndarray]:
    """``size`` samples from ``data`` (repeated when it has fewer): ``Dataset.batch_of``."""
    return data.batch_of(size)


#: the timed rounds of one batch stop after this many seconds once ``MIN_ROUNDS`` are done: a BERT-size model at
#: batch 64 takes a second per call, and 15 rounds of it were half a minute of a compile
BUDGET_SECONDS, MIN_ROUNDS = 8.0, 5


def latency_samples(runners: Mapping[str, Runner], feeds: Mapping[str, np.ndarray], *, rounds: int = 15,
                    min_seconds: float = 0.02, budget_seconds: float = BUDGET_SECONDS,
                    min_rounds: int = MIN_ROUNDS) -> dict[str, list[float]]:
    """Seconds per call of each runner in each round; the runners alternate within a round, after a warm-up.
    Up to ``rounds`` rounds, but no more once ``budget_seconds`` have gone and ``min_rounds`` are done."""
    for runner in runners.values():
        start = time.perf_counter()
        runner.run(feeds)
        if time.perf_counter() - start < 0.1:  # a slow model is warm after one call
            for _ in range(2):
                runner.run(feeds)
    # calls per round so that one round of each variant lasts about min_seconds
    calls = {}
    for name, runner in runners.items():
        start = time.perf_counter()
        runner.run(feeds)
        calls[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    began = time.perf_counter()
    for done in range(rounds):
        if done >= min_rounds and time.perf_counter() - began > budget_seconds:
            break
        for name, runner in runners.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                runner.run(feeds)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return samples


def latency(runners: Mapping[str, Runner], feeds: Mapping[str, np.ndarray], **options: float) -> dict[str, float]:
    """Median seconds per call for each runner, measured alternately."""
    return {name: float(np.median(v)) for name, v in latency_samples(runners, feeds, **options).items()}


#: the summary's larger batch: the largest of these whose fp32 call, estimated from batch 1's, stays under
#: ``LARGE_BATCH_SECONDS`` (8 at least: the batch the format search decides at). At batch 64 one fp32 call of a
#: sentence encoder (6 x 384, 128 tokens) took 1.3-2.8 s and of ResNet-18 at 224² about 1 s: the summary's timing
#: alone was ~15 s of a first compile. A model of 1.5 ms or less at batch 1 is still timed at batch 64.
LARGE_BATCHES, LARGE_BATCH_SECONDS = (64, 32, 16, 8), 0.1


def large_batch(batch1_seconds: float) -> int:
    """The larger batch the summary times, from fp32's seconds per call at batch 1 (scaled linearly: an
    overestimate, since larger batches run more efficiently)."""
    return next((b for b in LARGE_BATCHES if b * batch1_seconds <= LARGE_BATCH_SECONDS), LARGE_BATCHES[-1])


def latency_table(reference: Runner, artifact: Runner, data: Dataset, batches: tuple[int, ...] | None = None) -> dict:
    """Batch size -> fp32 ms, artifact ms, speedup and its noise band, all from one statistic.

    ``batches`` None: batch 1, then the larger batch ``large_batch`` picks from fp32's batch-1 time (its row says
    why). Times are medians over alternating rounds and ``speedup`` is exactly ``fp32_ms / artifact_ms``;
    ``speedup_band`` is the interquartile range of the per-round fp32/artifact ratios, so a reader
    (and ``speed_verdict``) can tell a real difference from noise."""
    table: dict[str, dict[str, Any]] = {}
    pending = list(batches) if batches is not None else [1, None]
    timed: set[int] = set()
    while pending:
        wanted = pending.pop(0)
        why = None
        if wanted is None:  # the larger batch, chosen from fp32 at batch 1 (measured first)
            first = table.get(f"batch_{data.batch_size(1)}")
            wanted = large_batch(first["fp32_ms"] / 1e3) if first else LARGE_BATCHES[0]
            why = (f"the largest of {'/'.join(map(str, LARGE_BATCHES))} whose fp32 call, scaled from batch 1's, "
                   f"stays under {LARGE_BATCH_SECONDS:g} s")
        size = data.batch_size(wanted)  # a fixed-batch model runs at its batch
        if size in timed:
            continue
        timed.add(size)
        samples = latency_samples({"fp32": reference, "artifact": artifact}, batch_of(data, size))
        fp32_ms, artifact_ms = 1e3 * float(np.median(samples["fp32"])), 1e3 * float(np.median(samples["artifact"]))
        ratios = np.array(samples["fp32"]) / np.array(samples["artifact"])
        table[f"batch_{size}"] = {"fp32_ms": fp32_ms, "artifact_ms": artifact_ms, "speedup": fp32_ms / artifact_ms,
                                  "speedup_band": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]}
        if why:
            table[f"batch_{size}"]["batch_chosen"] = why
    return table


#: a speed difference smaller than this is called "same" even when the band excludes 1
SAME_SPEED = 0.03


def speed_verdict(row: Mapping[str, Any]) -> str:
    """"1.45× faster", "1.20× slower" or "same speed": "same" when the measured noise band holds 1.0."""
    speed = float(row["speedup"])
    low, high = row.get("speedup_band", (speed, speed))
    if low <= 1.0 <= high or abs(speed - 1.0) < SAME_SPEED:
        return f"same speed (within noise, {low:.2f}–{high:.2f}×)"
    return f"{speed:.2f}× faster" if speed > 1 else f"{1 / speed:.2f}× slower"
