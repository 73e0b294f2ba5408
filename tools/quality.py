"""The quality gate: an artifact that loses more than a tolerance is repaired or refused, never shipped silently.

After compiling, the artifact is compared with the fp32 reference on held-out data (``--eval``; without it,
on calibration samples held back from calibration). The tolerance depends on what the model outputs:

* with class labels: accuracy may drop by at most 1 point (``accuracy-drop=1``);
* logits without labels: top-1 agreement with fp32 of at least 99 %, per position for sequence outputs
  (``agreement=0.99``);
* embeddings and features: the lowest cosine to fp32 at least 0.99 (``cosine=0.99``), per sample, or per real
  token for ``(batch, sequence, width)`` outputs of a model that takes an ``attention_mask`` (one bad token is not
  hidden by its well-kept neighbours, nor by padding);
* language models (token ids in, logits with a sequence axis out): the mean per-token KL divergence from the
  fp32 next-token distribution at most ``LM_KL_DEFAULT`` nats (``kl=0.03``), teacher-forced on token windows;
  ``lm_quality`` reports it with per-token top-1 agreement and bits per token (bits per byte for a byte-level
  model).

Whether an output is logits or an embedding is read from its name (``logits``, ``scores``, ``probs``...);
anything else is compared by cosine. ``--tolerance`` overrides it. When the artifact misses, layers go back to fp32, those that add the most
error first (measured on the gate data: how much a layer's output error exceeds its input's), searching
for the fewest such layers that meet the tolerance (one, two, four... then bisecting). Every step is
recorded. If even the all-fp32-layers artifact misses, the compile fails with one line saying by how much
and what was tried, unless the user allows the loss.

A gate on too few samples cannot see what its tolerance allows (one disagreement in 12 samples is 8 %, so 12
samples cannot tell 99 % agreement from 92 %): ``too_few_samples`` says so in one line, which the compile prints
as a warning and records in the manifest (the artifact is still written: the user may have no more data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.special

from bitpass.backends import measure
from bitpass.frontend import Dataset, Model, annotation
from bitpass.frontend.errors import UsageError
from bitpass.frontend.model import drop_mapped_pages

Metric = Literal["accuracy-drop", "agreement", "cosine", "kl"]
#: mean per-token KL (nats) a language model may drift from fp32 by default: about 2 % bits per byte on the real-
#: weight byte LM (tools/decoders.py, 2.19 bits/byte held out), where the cross-entropy increase measured 0.7-0.85x
#: the KL (ORT RTN 4-bit block 32: KL 0.0124 nats, +0.59 % bits/byte; block 128: KL 0.0203, +1.09 %; bitpass GPTQ
#: group 64: KL 0.0054, +0.27 %), and 2 % of 2.19 bits is 0.030 nats. Models with a higher cross-entropy get a
#: stricter bound than 2 % from it; ``--tolerance kl=`` sets another.
LM_KL_DEFAULT = 0.03
#: default tolerance per metric: points of accuracy lost, the least agreement / cosine kept, or the most KL
DEFAULTS: dict[Metric, float] = {"accuracy-drop": 1.0, "agreement": 0.99, "cosine": 0.99, "kl": LM_KL_DEFAULT}
#: metrics where lower is better
_AT_MOST = ("accuracy-drop", "kl")
#: calibration samples held back for the gate when there is no evaluation data
HOLD_BACK_FRACTION, HOLD_BACK_MAX, HOLD_BACK_MIN_SET = 0.2, 256, 10
#: the fewest samples a gate should measure on, whatever its metric: the lowest cosine, or a mean, over fewer says
#: little about the next input
MIN_GATE_SAMPLES = 32
#: samples the per-layer error ranking runs on
RANKING_SAMPLES = 32
#: samples per run while ranking (each run exposes every quantized activation of the graph)
RANKING_BATCH = 4


@dataclass(frozen=True)
class Tolerance:
    """What the artifact must meet: ``accuracy-drop`` at most, or ``agreement`` / ``cosine`` at least."""

    metric: Metric
    threshold: float

    def met(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value <= self.threshold + 1e-9 if self.metric in _AT_MOST else value >= self.threshold - 1e-12

    def describe(self, value: float | None = None) -> str:
        unit = {"accuracy-drop": " pt", "kl": " nats"}.get(self.metric, "")
        limit = f"{'≤' if self.metric in _AT_MOST else '≥'} {self.threshold:g}{unit}"
        if value is None:
            return f"{self.metric} {limit}"
        shown = f"{value:.2f} pt" if self.metric == "accuracy-drop" else f"{value:.5f} nats" if self.metric == "kl" \
            else f"{value:.4f}"
        return f"{self.metric} {shown} (needs {limit})"

    def shortfall(self, value: float) -> str:
        if self.metric == "accuracy-drop":
            return f"{value - self.threshold:.2f} points more accuracy lost than allowed"
        if self.metric == "kl":
            return f"{value - self.threshold:.5f} nats more per-token KL than allowed"
        return f"{self.threshold - value:.4f} below the required {self.metric}"

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "threshold": self.threshold}


def parse_tolerance(text: str) -> Tolerance:
    """``accuracy-drop=1`` (points), ``agreement=0.99`` or ``agreement=99%``, ``cosine=0.995``, ``kl=0.01`` (nats)."""
    metric, sep, raw = text.partition("=")
    metric = metric.strip().lower()
    if not sep or metric not in DEFAULTS:
        raise UsageError(f"--tolerance {text[:40]!r}: write accuracy-drop=POINTS, agreement=FRACTION, "
                         f"cosine=FRACTION (e.g. cosine=0.99) or kl=NATS (language models, e.g. kl=0.01)")
    raw = raw.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"--tolerance {text[:40]!r}: {raw[:20]!r} is not a number") from None
    if metric == "accuracy-drop" and not 0 <= value <= 100:
        raise UsageError(f"--tolerance {text[:40]!r}: an accuracy drop is 0 to 100 points")
    if metric == "kl" and not 0 <= value < math.inf:
        raise UsageError(f"--tolerance {text[:40]!r}: a KL bound is a non-negative number of nats")
    if metric in ("agreement", "cosine") and not -1 <= value <= 1:
        raise UsageError(f"--tolerance {text[:40]!r}: {metric} is a fraction (0.99, or 99%)")
    return Tolerance(metric, value)  # type: ignore[arg-type]


#: output-name fragments that say "class scores" (everything else without labels is compared by cosine)
LOGIT_NAMES = ("logit", "score", "prob", "class", "pred")


def output_kind(reference: Sequence[np.ndarray], output_names: Sequence[str], labels: np.ndarray | None) -> str:
    """``lm`` (a language model: logits with a sequence axis, ``(batch, sequence, vocab)``, named ``logits``; its
    labels, if any, are per token), ``classification`` (labels given), ``logits`` (the output's name says class
    scores: ``logits``, ``scores``, ``probs``...) or ``embedding`` (anything else: embeddings, features, hidden
    states, and outputs whose meaning bitpass cannot tell, compared by cosine; ``--tolerance agreement=0.99``
    asks for top-1 agreement instead)."""
    first = np.asarray(reference[0])
    name = (output_names[0] if output_names else "").lower()
    if is_lm_output(first, name) and (labels is None or np.asarray(labels).ndim == 2):
        return "lm"
    if labels is not None:
        return "classification"
    if any(fragment in name for fragment in LOGIT_NAMES) and first.ndim >= 2 and first.shape[-1] >= 2:
        return "logits"
    return "embedding"


def default_tolerance(kind: str) -> Tolerance:
    metric: Metric = {"classification": "accuracy-drop", "logits": "agreement",  # type: ignore[assignment]
                      "lm": "kl"}.get(kind, "cosine")
    return Tolerance(metric, DEFAULTS[metric])


def score(tolerance: Tolerance, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
          labels: np.ndarray | None, mask: np.ndarray | None = None) -> float:
    """The tolerance's metric for ``candidate`` against the fp32 ``reference`` outputs; ``mask`` (from
    ``token_mask``) makes the cosine per real token."""
    if tolerance.metric == "accuracy-drop":
        if labels is None:
            raise UsageError("--tolerance accuracy-drop needs labelled data (a 'labels' array in --eval)")
        if np.asarray(labels).ndim == 2:  # per-token labels of a language model
            return 100 * (token_accuracy(reference[0], labels) - token_accuracy(candidate[0], labels))
        return 100 * (measure.accuracy(list(reference), labels) - measure.accuracy(list(candidate), labels))
    ref, got = np.asarray(reference[0]), np.asarray(candidate[0])
    if tolerance.metric == "kl":
        return token_kl(ref, got)
    if tolerance.metric == "agreement":
        return agreement(ref, got)
    return float(np.min(cosines(ref, got, mask)))


#: the input that marks real tokens (1) and padding (0) in transformers' models
ATTENTION_MASK = "attention_mask"


def token_mask(inputs: Mapping[str, np.ndarray], reference: np.ndarray) -> np.ndarray | None:
    """The ``attention_mask`` input when ``reference`` is a ``(batch, sequence, width)`` output of the same batch
    and sequence (a transformer's hidden states), else None: then outputs are compared per sample."""
    mask = inputs.get(ATTENTION_MASK)
    reference = np.asarray(reference)
    if mask is None or reference.ndim != 3 or np.shape(mask) != reference.shape[:2]:
        return None
    return np.asarray(mask).astype(bool)


def cosines(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Cosine to fp32 per sample, or, with a token ``mask``, per real token (padding left out)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if mask is not None and reference.ndim == 3 and mask.shape == reference.shape[:2]:
        return measure.cosines(reference[mask], candidate[mask])
    return measure.cosines(reference, candidate)


def gate_units(tolerance: Tolerance, reference: np.ndarray, labels: np.ndarray | None,
               mask: np.ndarray | None = None) -> int:
    """How many values the tolerance's metric is a fraction, mean or minimum of: positions for sequence logits
    (agreement, KL) and per-token labels, real tokens for a masked cosine, else samples."""
    reference = np.asarray(reference)
    if tolerance.metric == "accuracy-drop" and labels is not None and np.ndim(labels) == 2:
        return int(np.sum(np.asarray(labels) >= 0))
    if tolerance.metric in ("agreement", "kl") and reference.ndim >= 3:
        return int(np.prod(reference.shape[:-1]))
    if tolerance.metric == "cosine" and mask is not None and reference.ndim == 3 and mask.shape == reference.shape[:2]:
        return int(mask.sum())
    return len(reference)


def samples_needed(tolerance: Tolerance) -> int:
    """The fewest values that resolve ``tolerance``: agreement ≥ t sees a disagreement rate of 1 - t only over
    1 / (1 - t) of them (0.99: 100), an accuracy drop of d points only over 100 / d samples (1 point: 100); any
    metric needs ``MIN_GATE_SAMPLES``."""
    slack = 1 - tolerance.threshold if tolerance.metric == "agreement" else \
        tolerance.threshold / 100 if tolerance.metric == "accuracy-drop" else 0.0
    needed = math.ceil(1 / slack - 1e-9) if slack > 0 else 0
    return max(MIN_GATE_SAMPLES, needed)


def too_few_samples(tolerance: Tolerance, samples: int, units: int | None = None) -> str | None:
    """One line when a gate on ``samples`` samples (``units`` values: positions, tokens) cannot resolve
    ``tolerance``, else None. A share (agreement, accuracy) counts ``units``; the floor counts samples."""
    units = samples if units is None else units
    needed = samples_needed(tolerance)
    step = 100 / max(units, 1)
    if tolerance.metric in ("agreement", "accuracy-drop") and needed > MIN_GATE_SAMPLES and units < needed:
        what = "disagreement" if tolerance.metric == "agreement" else "sample"
        counted = "samples" if units == samples else f"positions ({samples} samples)"
        noun = counted.split(" ")[0]
        why = f"one {what} moves it by {step:.1f} {'%' if tolerance.metric == 'agreement' else 'points'}"
        return (f"quality gate measured on {units} {counted}: too few to resolve {tolerance.describe()} ({why}); "
                f"pass --eval with at least {needed} held-out {noun}")
    if samples < MIN_GATE_SAMPLES:
        return (f"quality gate measured on {samples} samples: too few to resolve {tolerance.describe()} (a "
                f"{'lowest value' if tolerance.metric == 'cosine' else 'mean'} over fewer than {MIN_GATE_SAMPLES} "
                f"samples says little about the next input); pass --eval with at least {MIN_GATE_SAMPLES} held-out "
                f"samples")
    return None


def agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Top-1 agreement over the last axis, for every sample and position (per token for sequence logits).
    Where the reference's maximum is tied (all-zero rows, saturated scores, or classes within 0.1 % of the
    row's score range of the top: fp32 rounding alone flips those) any of the tied classes agrees."""
    if reference.ndim < 2 or reference.shape[-1] < 2:
        return 1.0 if np.array_equal(np.sign(reference), np.sign(candidate)) else 0.0
    rows, candidates = reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
    hits = 0
    for start in range(0, len(rows), _CHUNK):  # a few positions at a time: a 50k vocabulary in float64 is large
        ref = rows[start:start + _CHUNK].astype(np.float64)
        got = candidates[start:start + _CHUNK].argmax(1)
        drop_mapped_pages((reference, candidate))
        top = ref.max(axis=1, keepdims=True)
        spread = top - ref.min(axis=1, keepdims=True)
        slack = np.maximum(1e-6 * np.abs(top), 1e-3 * spread) + 1e-30
        hits += int((ref[np.arange(len(got)), got] >= (top - slack)[:, 0]).sum())
    return hits / len(rows) if len(rows) else float("nan")


def hold_back(calibration: Dataset | None) -> tuple[Dataset | None, Dataset | None]:
    """(calibration to use, samples held back for the gate): the last 20 % (at most 256) of a calibration set
    of at least 10 samples; small sets are not split (the gate then has no data)."""
    if calibration is None or len(calibration) < HOLD_BACK_MIN_SET:
        return calibration, None
    held = min(HOLD_BACK_MAX, max(1, int(len(calibration) * HOLD_BACK_FRACTION)))
    if calibration.fixed_batch:
        held = max(calibration.fixed_batch, held - held % calibration.fixed_batch)
        if held >= len(calibration):
            return calibration, None
    cut = len(calibration) - held
    return calibration.take(0, cut), calibration.take(cut)


# --- language models ----------------------------------------------------------------------------
#: output-name fragment that marks a language model's next-token scores
LM_OUTPUT = "logit"
#: positions per chunk when log-softmaxing (a 50k vocabulary in float64 is 400 KB per position: the KL's temporaries
#: for 256 positions took 0.7 GB)
_CHUNK = 64


def is_lm_output(first: np.ndarray, name: str) -> bool:
    """Logits with a sequence axis: ``(batch, sequence, vocab)`` from an output named ``logits``."""
    return LM_OUTPUT in name.lower() and first.ndim == 3 and first.shape[-1] >= 2


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (scipy's stable form)."""
    return scipy.special.log_softmax(np.asarray(rows, np.float64), axis=-1)


def _position_chunks(reference: np.ndarray, candidate: np.ndarray):  # noqa: ANN202 - a small generator
    ref, got = reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
    for start in range(0, len(ref), _CHUNK):
        yield start, _log_softmax(ref[start:start + _CHUNK]), _log_softmax(got[start:start + _CHUNK])
        drop_mapped_pages((reference, candidate))  # file-backed logits (``measure.predict``): read once


def token_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over positions of KL(fp32 next-token distribution || candidate's), in nats."""
    total, count = 0.0, 0
    for _, logp, logq in _position_chunks(reference, candidate):
        total += float((np.exp(logp) * (logp - logq)).sum())
        count += len(logp)
    return total / max(count, 1)


def _targets(ids: np.ndarray | None, labels: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The token each position predicts, -100 where none: ``labels`` (per token, as transformers aligns them:
    position t's target is ``labels[:, t + 1]``), else the next input id (teacher forcing)."""
    source = labels if labels is not None else ids
    if source is None or np.asarray(source).shape != shape[:2]:
        return None
    source = np.asarray(source, np.int64)
    targets = np.full(shape[:2], -100, np.int64)
    targets[:, :-1] = source[:, 1:]
    targets[(targets < 0) | (targets >= shape[2])] = -100
    return targets


def token_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Next-token top-1 accuracy against per-token ``labels`` (aligned as transformers does; -100 ignored)."""
    targets = _targets(None, labels, logits.shape)
    if targets is None:
        raise UsageError(f"'labels' has shape {np.shape(labels)}: per-token labels of a language model are "
                         f"(samples, sequence) = {logits.shape[:2]}")
    scored = targets >= 0
    return float((logits.argmax(-1)[scored] == targets[scored]).mean()) if scored.any() else 0.0


def lm_quality(reference: np.ndarray, candidate: np.ndarray, ids: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> dict[str, Any]:
    """A language model's fidelity to fp32, per predicted token, teacher-forced: mean KL (nats), top-1 agreement,
    and, with the token ids (or per-token labels), bits per token of both and their relative increase
    (for a byte-level model: bits per byte). Also the keys every artifact's fidelity has (``top1_agreement`` per
    token, mean per-sample ``cosine``, ``max_abs_error``)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    targets = _targets(ids, labels, reference.shape)
    kl = agree = 0.0
    bits_ref = bits_got = 0.0
    count = scored = 0
    flat_targets = targets.reshape(-1) if targets is not None else None
    for start, logp, logq in _position_chunks(reference, candidate):
        kl += float((np.exp(logp) * (logp - logq)).sum())
        agree += float((logp.argmax(-1) == logq.argmax(-1)).sum())
        count += len(logp)
        if flat_targets is not None:
            chunk = flat_targets[start:start + len(logp)]
            keep = chunk >= 0
            bits_ref -= float(logp[keep, chunk[keep]].sum())
            bits_got -= float(logq[keep, chunk[keep]].sum())
            scored += int(keep.sum())
    result: dict[str, Any] = {"tokens": count, "kl": kl / max(count, 1), "top1_agreement": agree / max(count, 1)}
    if scored:
        ref_bits, got_bits = bits_ref / scored / math.log(2), bits_got / scored / math.log(2)
        result.update(scored_tokens=scored, bits_per_token={"fp32": ref_bits, "artifact": got_bits},
                      bits_per_token_increase=got_bits / ref_bits - 1 if ref_bits > 0 else 0.0)
    if labels is not None:
        result["token_accuracy"] = {"fp32": token_accuracy(reference, labels),
                                    "artifact": token_accuracy(candidate, labels)}
    fidelity = {"top1_agreement": result["top1_agreement"],
                "cosine": float(np.mean(measure.cosines(reference, candidate))),
                "max_abs_error": measure.max_abs_error(reference, candidate)}
    return {"fidelity": fidelity, "lm": result}


# --- repair -----------------------------------------------------------------------------------------
def quantized_layers(model: Model) -> list[str]:
    """Ids of layers ``model`` will quantize (weights or activations below fp32; unannotated means int8)."""
    ids = []
    for layer in model.layers():
        weight = annotation.weight_bits(layer.node)
        activation = annotation.activation_bits(layer.node)
        if (weight is None or weight < annotation.FLOAT_BITS) or (activation is not None
                                                                  and activation < annotation.FLOAT_BITS):
            ids.append(layer.id)
    return ids


def rank_by_added_error(before: Model, after: Model, data: Dataset, candidates: Sequence[str]) -> list[str]:
    """``candidates`` ordered by how much error each layer's quantization adds, measured on a few samples:

    * the rounding error of every activation the compiled model quantizes (a QuantizeLinear →
      DequantizeLinear pair: DQ(Q(t)) against t in the same run), charged to the layers on both sides of
      it, since ONNX Runtime quantizes a tensor when its producer *or* its consumer is quantized;
    * for layers whose output tensor exists in both graphs, how much the output's relative error exceeds
      the input's (``before`` is the same graph before quantization).

    A layer scores the larger of the two. Layers nothing could be measured for keep their sensitivity
    annotation's order, after the rest."""
    from bitpass.passes import execution

    wanted = set(candidates)
    layers = {layer.id: layer for layer in before.layers() if layer.id in wanted}
    sample = data.head(RANKING_SAMPLES)
    scores: dict[str, float] = {}

    def charge(layer_id: str | None, value: float) -> None:
        if layer_id in wanted and math.isfinite(value):
            scores[layer_id] = max(scores.get(layer_id, 0.0), value)

    # 1. activation rounding, read off the compiled graph's Q -> DQ pairs
    pairs = _quantized_activations(after)
    if pairs:
        names = sorted({n for tensor, dq, _, _ in pairs for n in (tensor, dq)})
        errors = _Errors()
        try:
            for batch in execution.intermediates(after, sample, names, batch_size=RANKING_BATCH):
                for tensor, dq, _, _ in pairs:
                    if tensor in batch and dq in batch:
                        errors.add(tensor, batch[tensor], batch[dq])
        except Exception:  # a graph the ranking cannot run: fall back to the other signals
            errors = _Errors()
        for tensor, _, producer, consumers in pairs:
            for layer_id in (producer, *consumers):
                charge(layer_id, errors.relative(tensor))
    # 2. output error beyond the input's, where the tensors carry the same names in both graphs
    after_names = {v.name for node in after.graph.all_nodes() for v in node.outputs if v is not None} \
        | {v.name for v in after.graph.inputs}
    matched = {}
    for layer_id, layer in layers.items():
        x = layer.node.inputs[0].name if layer.node.inputs and layer.node.inputs[0] is not None else None
        y = layer.node.outputs[0].name if layer.node.outputs else None
        if y in after_names:
            matched[layer_id] = (x if x in after_names else None, y)
    names = sorted({n for pair in matched.values() for n in pair if n})
    if names:
        errors = _Errors()
        try:  # both graphs batch by batch in step: one batch of tensors in memory at a time
            for ref, got in zip(execution.intermediates(before, sample, names, batch_size=RANKING_BATCH),
                                execution.intermediates(after, sample, names, batch_size=RANKING_BATCH)):
                for name in names:
                    if name in ref and name in got:
                        errors.add(name, ref[name], got[name])
        except Exception:
            errors = _Errors()
        for layer_id, (x, y) in matched.items():
            if errors.has(y):
                charge(layer_id, errors.relative(y) - (errors.relative(x) if x and errors.has(x) else 0.0))
    sensitivity = {layer_id: _sensitivity(layer) for layer_id, layer in layers.items()}
    order = {layer_id: index for index, layer_id in enumerate(candidates)}
    measured = sorted((l for l in candidates if l in scores), key=lambda l: (-scores[l], order[l]))
    rest = sorted((l for l in candidates if l not in scores), key=lambda l: (-sensitivity.get(l, 0.0), order[l]))
    return measured + rest


def _quantized_activations(model: Model) -> list[tuple[str, str, str | None, list[str | None]]]:
    """(tensor, its dequantized copy, producing layer, consuming layers) for every activation that goes through
    QuantizeLinear -> DequantizeLinear in ``model`` (weights, which are constants, are not activations)."""
    found = []
    for node in model.graph.all_nodes():
        if node.op_type != "QuantizeLinear" or not node.inputs or node.inputs[0] is None:
            continue
        tensor = node.inputs[0]
        if tensor.const_value is not None:
            continue
        producer = tensor.producer()
        producer_id = annotation.layer_id(producer) if producer is not None else None
        for use in node.outputs[0].uses():
            dq = use.node
            if dq.op_type != "DequantizeLinear" or not dq.outputs:
                continue
            consumers = [annotation.layer_id(u.node) for u in dq.outputs[0].uses()]
            found.append((tensor.name, dq.outputs[0].name, producer_id, consumers))
    return found


class _Errors:
    """Streaming relative errors ``|candidate - reference| / |reference|`` per tensor name, summed over batches
    (whole activations of a ResNet-50 over the ranking samples would not fit in memory)."""

    def __init__(self) -> None:
        self.diff: dict[str, float] = {}
        self.norm: dict[str, float] = {}

    def add(self, name: str, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            return
        reference = np.asarray(reference, dtype=np.float64)
        self.diff[name] = self.diff.get(name, 0.0) + float(np.square(np.asarray(candidate, np.float64) - reference).sum())
        self.norm[name] = self.norm.get(name, 0.0) + float(np.square(reference).sum())

    def has(self, name: str) -> bool:
        return name in self.norm

    def relative(self, name: str) -> float:
        norm = self.norm.get(name, 0.0)
        return math.sqrt(self.diff[name] / norm) if norm > 0 else (0.0 if name in self.norm else math.nan)


def _sensitivity(layer: Any) -> float:
    values = [v for v in annotation.sensitivities(layer.node).values() if isinstance(v, (int, float))]
    return float(max(values)) if values else 0.0


@dataclass
class Search:
    """The fewest top-ranked layers to put back in fp32 so that the artifact meets the tolerance.

    ``evaluate(k)`` builds the artifact with the first ``k`` ranked layers in fp32 and returns the metric;
    the search tries k = 1, 2, 4, ... (at most every layer) and then bisects between the last miss and the
    first hit. Every evaluation is kept in ``steps``.
    """

    ranked: list[str]
    tolerance: Tolerance
    evaluate: Callable[[int], float]
    steps: list[dict[str, Any]] = field(default_factory=list)

    def _try(self, k: int) -> bool:
        value = self.evaluate(k)
        self.steps.append({"fp32_layers": self.ranked[:k], "value": value, "met": self.tolerance.met(value)})
        return self.tolerance.met(value)

    def run(self) -> int | None:
        """The smallest k found that meets the tolerance, or None when even every layer in fp32 misses."""
        total = len(self.ranked)
        if total == 0:
            return None
        low, k = 0, 1  # low: the largest k known to miss
        while True:
            k = min(k, total)
            if self._try(k):
                break
            if k == total:
                return None
            low, k = k, 2 * k
        high = k
        while high - low > 1:
            middle = (low + high) // 2
            if self._try(middle):
                high = middle
            else:
                low = middle
        return high
