"""Measure an artifact against its fp32 reference: quality, size and latency, in one run.

Quality is classification accuracy when the data has labels, and always the
fidelity to the reference outputs (top-1 agreement, cosine, max abs error).
Latency alternates the variants inside one process and takes medians, because
ONNX Runtime timings drift within a process (NOTES.md).
"""

from __future__ import annotations

import mmap
import tempfile
import time
from collections.abc import Mapping
from typing import Any
from dataclasses import asdict, dataclass

import numpy as np

from bitpass.backends.base import Runner
from bitpass.frontend import Dataset
from bitpass.frontend.errors import DataError
from bitpass.frontend.model import drop_mapped_pages

EVAL_BATCH = 256
#: bytes of output one batch of a language model's prediction may make (``batch_for``): ONNX Runtime's arena keeps
#: room for the largest output a session has made until the session goes (a 355 M GPT-2's logits for 32 windows of
#: 128 tokens at once: 0.8 GB more in each session)
BATCH_OUTPUT_BYTES = 64 << 20


def batch_for(sample_bytes: int, batch_size: int = EVAL_BATCH) -> int:
    """Samples per prediction batch when one sample's outputs take ``sample_bytes`` (``BATCH_OUTPUT_BYTES``)."""
    return max(1, min(batch_size, BATCH_OUTPUT_BYTES // max(int(sample_bytes), 1)))


#: an output this large over a whole dataset is gathered batch by batch in an unnamed temporary file and read back
#: through a read-only memory map (``predict``): a 355 M GPT-2's logits on 32 windows of 128 tokens are 0.82 GB, and
#: held in memory the reference's and the artifact's sat beside the artifact's session, joining them twice as much
SPILL_BYTES = 64 << 20


def predict(runner: Runner, data: Dataset, batch_size: int = EVAL_BATCH, count: int | None = None) -> list[np.ndarray]:
    """All outputs of ``runner`` over ``data`` (only the first ``count`` when given: ``Runner.run_first``),
    concatenated along the first axis. An output past ``SPILL_BYTES`` comes back read-only and file-backed
    (``frontend.model.drop_mapped_pages`` lets go of the pages a reader touched); the others are plain arrays."""
    gathered: list[_Gathered] | None = None
    for feeds in data.batches(batch_size):
        outputs = runner.run(feeds) if count is None else runner.run_first(feeds, count)
        if gathered is None:
            gathered = [_Gathered(np.asarray(o), len(data)) for o in outputs]
        for into, output in zip(gathered, outputs):
            into.add(np.asarray(output))
        del outputs
    return [g.result() for g in gathered or []]


class _Gathered:
    """One output's batches joined along axis 0: in memory, or past ``SPILL_BYTES`` (judged from the first batch) in
    an unnamed temporary file, so neither the batches nor the joined array are process memory. The file has no name:
    nothing is left on disk whatever happens."""

    def __init__(self, first: np.ndarray, samples: int) -> None:
        per_sample = first.nbytes / max(first.shape[0], 1) if first.ndim else first.nbytes
        self._file = tempfile.TemporaryFile(prefix="bitpass-outputs-") \
            if first.ndim and per_sample * samples > SPILL_BYTES else None
        self._parts: list[np.ndarray] = []
        self._dtype, self._tail, self._rows = first.dtype, first.shape[1:], 0

    def add(self, part: np.ndarray) -> None:
        if self._file is None:
            self._parts.append(part)
            return
        if part.dtype != self._dtype or part.shape[1:] != self._tail:
            raise ValueError(f"an output changes from {self._dtype}{list(self._tail)} to {part.dtype}"
                             f"{list(part.shape[1:])} between batches: cannot join them")
        self._file.write(np.ascontiguousarray(part).data)
        self._rows += part.shape[0]

    def result(self) -> np.ndarray:
        if self._file is None:
            joined = np.concatenate(self._parts)
            self._parts.clear()
            return joined
        with self._file:
            self._file.flush()
            if self._rows == 0 or not self._dtype.itemsize or 0 in self._tail:
                return np.empty((self._rows, *self._tail), self._dtype)
            mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the file's handle
        return np.frombuffer(mapped, self._dtype).reshape((self._rows, *self._tail))


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
    Rows are taken a few at a time, and a long row (a language model's window: 6 M logits) a piece at a
    time (``_CHUNK_ELEMENTS``): the same figures, bounded memory."""
    ref_rows = reference.reshape(len(reference), -1)
    got_rows = candidate.reshape(len(candidate), -1)
    width = max(ref_rows.shape[1], 1)
    step, piece = max(1, _CHUNK_ELEMENTS // width), min(width, _CHUNK_ELEMENTS)
    parts = []
    for start in range(0, len(ref_rows), step):
        parts.append(_row_cosines(ref_rows[start:start + step], got_rows[start:start + step], piece))
        drop_mapped_pages((reference, candidate))  # file-backed outputs (``predict``): read once, not kept resident
    return np.clip(np.concatenate(parts) if parts else np.zeros(0), -1.0, 1.0)


def _row_cosines(ref: np.ndarray, got: np.ndarray, piece: int) -> np.ndarray:
    """``cosines`` of a few rows, summed over ``piece`` columns at a time."""
    columns = [slice(c, c + piece) for c in range(0, ref.shape[1], piece)]
    ref_peak = _row_peak(ref, columns)
    got_peak = _row_peak(got, columns)
    dot, ref_norm, got_norm = (np.zeros(len(ref)) for _ in range(3))
    for where in columns:
        r, g = _scaled(ref[:, where], ref_peak), _scaled(got[:, where], got_peak)
        dot += np.einsum("ij,ij->i", r, g)
        ref_norm += np.einsum("ij,ij->i", r, r)
        got_norm += np.einsum("ij,ij->i", g, g)
    norm = np.sqrt(ref_norm) * np.sqrt(got_norm)
    result = np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0)
    ref_zero, got_zero = ref_norm == 0, got_norm == 0
    result[ref_zero & got_zero] = 1.0
    result[ref_zero ^ got_zero] = 0.0
    return result


def _row_peak(rows: np.ndarray, columns: list[slice]) -> np.ndarray:
    peaks = [np.max(np.abs(rows[:, where]), axis=1) for where in columns]
    return np.max(peaks, axis=0).astype(np.float64) if peaks else np.zeros(len(rows))


def _scaled(rows: np.ndarray, peak: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return np.divide(rows, peak[:, None], out=np.zeros_like(rows), where=peak[:, None] > 0)


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The largest absolute difference, taken a few samples at a time (no full-size temporaries)."""
    if not reference.size:
        return 0.0
    ref_rows = reference.reshape(len(reference), -1)
    got_rows = candidate.reshape(len(candidate), -1)
    step = max(1, _CHUNK_ELEMENTS // max(ref_rows.shape[1], 1))
    largest = 0.0
    for i in range(0, len(ref_rows), step):
        largest = max(largest, float(np.max(np.abs(ref_rows[i:i + step] - got_rows[i:i + step]))))
        drop_mapped_pages((reference, candidate))
    return largest


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
    drop_mapped_pages([*ref_out, *art_out])
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
