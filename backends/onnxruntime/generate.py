"""Run a KV-cache decoder graph in ONNX Runtime: greedy generation, decode/prefill speed, LM fidelity, memory.

The graph is the one ``bitpass.frontend.decoder.export_decoder`` writes (ORT GenAI's layout: ``input_ids``,
``attention_mask``, ``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.key/value`` out).
Fidelity of a language model is per token: each predicted position is one sample (a top-1 agreement taken
as one argmax over sequence x vocabulary says nothing about the tokens a generator would emit).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bitpass.frontend.decoder import DecoderSpec, spec_from_model
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.frontend.model import Model
from bitpass.passes.execution import create_session

Past = dict[str, np.ndarray]
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}


#: the key under which a decoder without a cache keeps the tokens so far in its ``Past``
HISTORY = "bitpass.history"


class DecoderSession:
    """An ONNX Runtime session over a decoder graph, with prefill and decode steps.

    With a KV cache, each step feeds the new tokens and the previous presents. A language model without a
    cache (``spec.layers == 0``) keeps the token history instead and reruns it whole at every step."""

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        missing = sorted((set(spec.input_names) - set(inputs)) | ({spec.logits, *spec.all_present} - outputs))
        if missing:
            raise BitpassError(f"not the decoder graph its spec describes: {', '.join(missing[:4])} missing; "
                               "export the model with bitpass.frontend.decoder.export_decoder")
        self.session, self.spec = session, spec
        #: every cache input (keys, values, and any per-token scales of a quantized cache)
        self._past = {name: inputs[name] for name in spec.all_past}
        #: the output that becomes each cache input at the next step
        self._present = dict(zip(spec.all_present, spec.all_past))
        self._outputs = [spec.logits, *self._present]

    def _past_array(self, name: str, batch: int, length: int, rng: np.random.Generator | None) -> np.ndarray:
        value = self._past[name]
        dims = [batch if i == 0 else length if i == 2 else int(d) if isinstance(d, int) else
                int(d) if isinstance(d, str) and d.isdigit() else 1 for i, d in enumerate(value.shape)]
        dtype = _ORT_TYPES.get(value.type, np.float32)
        if rng is None:
            return np.zeros(dims, dtype)
        if np.issubdtype(dtype, np.integer):
            return rng.integers(-100, 100, dims).astype(dtype)
        return np.abs(rng.standard_normal(dims)).astype(dtype) if name.endswith("_scale") \
            else rng.standard_normal(dims).astype(dtype)

    @classmethod
    def load(cls, source: Model | bytes | str | os.PathLike[str], spec: DecoderSpec | None = None, *,
             threads: int | None = None, for_timing: bool = False,
             config: Mapping[str, Any] | None = None) -> DecoderSession:
        """A session over a ``Model``, serialized bytes or a file path (a path keeps external data beside it; a
        ``Model`` past 2 GiB is handed over by path too: ``execution.create_session``)."""
        if isinstance(source, Model):
            spec = spec or spec_from_model(source)
        if spec is None:
            raise UsageError("a decoder given as bytes or a path needs its DecoderSpec")
        session = create_session(source, config=config, threads=threads, for_timing=for_timing,
                                 purpose="load the decoder")
        return cls(session, spec)

    @property
    def has_cache(self) -> bool:
        return self.spec.layers > 0

    def empty_past(self, batch: int = 1) -> Past:
        """Zero-length cache tensors (no history, for a model without a cache): the feeds of a prefill."""
        if not self.has_cache:
            return {HISTORY: np.zeros((batch, 0), np.int64)}
        return {name: self._past_array(name, batch, 0, None) for name in self._past}

    def random_past(self, batch: int, length: int, seed: int = 0) -> Past:
        """A past of ``length`` positions with random values: decode-step timing does not depend on values."""
        rng = np.random.default_rng(seed)
        if not self.has_cache:
            return {HISTORY: rng.integers(0, self.spec.vocab, (batch, length)).astype(np.int64)}
        return {name: self._past_array(name, batch, length, rng) for name in self._past}

    @staticmethod
    def past_length(past: Past) -> int:
        first = next(iter(past.values()), None)
        return 0 if first is None else int(first.shape[1] if HISTORY in past else first.shape[2])

    def forward(self, ids: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """Logits for ``ids`` (batch, sequence) after ``past``; and the presents, renamed as the next past."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise UsageError(f"token ids must be (batch, sequence), got shape {ids.shape}")
        past_length = self.past_length(past)
        limit = self.spec.max_positions
        if limit and past_length + ids.shape[1] > limit:
            raise UsageError(f"{past_length + ids.shape[1]} positions exceed the model's {limit}: "
                             "generate fewer tokens or use a shorter prompt")
        if not self.has_cache:
            history = np.concatenate([past.get(HISTORY, np.zeros((ids.shape[0], 0), np.int64)), ids], axis=1)
            logits = self.session.run([self.spec.logits], self.spec.feeds(history))[0]
            return logits[:, -ids.shape[1]:], {HISTORY: history}
        outputs = self.session.run(self._outputs, self.spec.feeds(ids, past))
        return outputs[0], {self._present[name]: array for name, array in zip(self._outputs[1:], outputs[1:])}

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Past]:
        return self.forward(ids, self.empty_past(np.asarray(ids).shape[0]))


def generate(session: DecoderSession, prompt: np.ndarray | bytes | str, new_tokens: int) -> np.ndarray:
    """Greedy decoding: prefill the prompt, then ``new_tokens`` one-token steps; returns (batch, new_tokens).

    A ``bytes``/``str`` prompt is a byte-level prompt (UTF-8): one row of token ids = byte values.
    """
    ids = _prompt_ids(prompt)
    if ids.size == 0:
        raise UsageError("the prompt is empty: give at least one token")
    logits, past = session.prefill(ids)
    tokens = []
    for step in range(new_tokens):
        token = logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]
        tokens.append(token)
        if step + 1 < new_tokens:
            logits, past = session.forward(token, past)
    return np.concatenate(tokens, axis=1) if tokens else np.zeros((ids.shape[0], 0), np.int64)


@dataclass(frozen=True)
class Generation:
    """Greedy tokens generated after a prompt, with the time the prefill and the decode steps took."""

    prompt: np.ndarray  # (1, prompt length)
    tokens: np.ndarray  # (1, generated)
    prefill_seconds: float
    decode_seconds: float  # every one-token step after the prefill

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.shape[1] - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt.shape[1] / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


def timed_generate(session: DecoderSession, prompt: np.ndarray, new_tokens: int) -> Generation:
    """``generate`` for one prompt row, timing the prefill and the decode steps apart."""
    ids = _prompt_ids(prompt)
    if ids.size == 0:
        raise UsageError("the prompt is empty: give at least one token")
    if new_tokens < 1:
        raise UsageError(f"--generate {new_tokens}: generate at least one token")
    started = time.perf_counter()
    logits, past = session.prefill(ids)
    prefill = time.perf_counter() - started
    tokens = [logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]]
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, past = session.forward(tokens[-1], past)
        tokens.append(logits[:, -1, :].argmax(-1).astype(np.int64)[:, None])
    return Generation(ids, np.concatenate(tokens, axis=1), prefill, time.perf_counter() - started)


def byte_level(spec: DecoderSpec) -> bool:
    """A vocabulary of the 256 byte values: token ids are UTF-8 bytes (no tokenizer needed)."""
    return spec.vocab == 256


def prompt_tokens(spec: DecoderSpec, *, text: str | None = None, ids: str | None = None) -> np.ndarray:
    """The prompt as one row of token ids: ``text``'s UTF-8 bytes for a byte-level model, or ``ids`` written
    ``1,2,3``. Refused, saying what to give, when it does not fit the vocabulary."""
    if (text is None) == (ids is None):
        raise UsageError("give the prompt as --prompt TEXT (byte-level models) or --prompt-ids 1,2,3")
    if text is not None:
        if not byte_level(spec):
            raise UsageError(f"--prompt is text, but this model's tokens are not bytes (a vocabulary of {spec.vocab}, "
                             f"not 256) and bitpass has no tokenizer: give token ids with --prompt-ids 1,2,3")
        return _prompt_ids(text)
    try:
        row = [int(part) for part in str(ids).replace(" ", "").split(",") if part]
    except ValueError:
        raise UsageError(f"--prompt-ids {str(ids)[:40]!r}: write integers separated by commas, e.g. 1,2,3") from None
    bad = [t for t in row if not 0 <= t < spec.vocab]
    if bad:
        raise UsageError(f"--prompt-ids: token {bad[0]} is outside the vocabulary 0..{spec.vocab - 1}")
    return np.asarray([row], np.int64)


def open_decoder(directory: str | os.PathLike[str], *, threads: int | None = None) -> DecoderSession:
    """A ``DecoderSession`` over an artifact folder, refused unless every file is as compiled and its graph is a
    language model (``bitpass.decoder`` metadata, or recognizable inputs and outputs)."""
    from bitpass.backends import artifact
    from bitpass.backends.onnxruntime.runner import confined_model_path, read_session_config
    from bitpass.frontend import from_onnx
    from bitpass.frontend.decoder import lm_spec

    folder = Path(directory)
    manifest = artifact.read_manifest(folder)
    problems = artifact.verify_files(folder, manifest)
    if problems:
        raise BitpassError(f"{folder}: {problems[0]}; run `bitpass verify` for details")
    if manifest.get("backend") != "onnxruntime":
        raise UsageError(f"{folder}: a {manifest.get('backend')} artifact; --generate runs ONNX Runtime artifacts")
    path = confined_model_path(folder)
    spec = lm_spec(from_onnx(path))
    if spec is None:
        raise UsageError(f"{folder}: not a language model (no token-id input and logits with a sequence axis): "
                         f"--generate needs one; run it with --input instead")
    return DecoderSession.load(path, spec, threads=threads, config=read_session_config(folder))


def _prompt_ids(prompt: np.ndarray | bytes | str) -> np.ndarray:
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    if isinstance(prompt, bytes):
        return np.frombuffer(prompt, np.uint8).astype(np.int64)[None, :]
    ids = np.asarray(prompt, dtype=np.int64)
    return ids[None, :] if ids.ndim == 1 else ids


# --- fidelity --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMFidelity:
    """Per-token fidelity of a language model to its reference, teacher-forced on held-out windows."""

    bits_per_byte: float  # the candidate's mean cross-entropy in bits per predicted token
    reference_bits_per_byte: float
    kl: float  # mean over predicted tokens of KL(reference || candidate), in nats
    top1_agreement: float  # fraction of predicted tokens whose argmax matches the reference's
    tokens: int

    @property
    def bits_per_byte_increase(self) -> float:
        """Relative increase of bits per byte over the reference (0.02 = 2 % worse)."""
        return self.bits_per_byte / self.reference_bits_per_byte - 1.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def teacher_forced(session: DecoderSession, windows: np.ndarray, *, batch: int = 16) -> Iterator[np.ndarray]:
    """Log-probabilities (batch, length - 1, vocab) of each window's next tokens, one chunk at a time
    (a whole held-out set of a 50k-vocabulary model would not fit in memory)."""
    windows = np.asarray(windows, dtype=np.int64)
    for start in range(0, len(windows), batch):
        logits, _ = session.prefill(windows[start:start + batch, :-1])
        yield _log_softmax(logits)


def decoded(session: DecoderSession, windows: np.ndarray, *, prefix: int, batch: int = 16) -> Iterator[np.ndarray]:
    """Like ``teacher_forced``, but the first ``prefix`` tokens are a prefill and every later token is fed
    in its own decode step: log-probabilities ``(batch, length - prefix, vocab)`` of tokens ``prefix..``,
    each predicted from the cache (what a quantized cache changes; a prefill never reads its cache)."""
    windows = np.asarray(windows, dtype=np.int64)
    if not 0 < prefix < windows.shape[1]:
        raise UsageError(f"prefix {prefix} must leave tokens to decode in windows of {windows.shape[1]}")
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        logits, past = session.prefill(chunk[:, :prefix])
        steps = [logits[:, -1:]]
        for position in range(prefix, chunk.shape[1] - 1):
            logits, past = session.forward(chunk[:, position:position + 1], past)
            steps.append(logits)
        yield _log_softmax(np.concatenate(steps, axis=1))


def bits_per_byte(session: DecoderSession, windows: np.ndarray, *, batch: int = 16) -> float:
    """Teacher-forced mean bits per predicted token over ``windows`` (count, length) of token ids."""
    total, count = 0.0, 0
    for start, logp in zip(range(0, len(windows), batch), teacher_forced(session, windows, batch=batch)):
        targets = np.asarray(windows[start:start + batch, 1:], dtype=np.int64)
        total -= float(np.take_along_axis(logp, targets[..., None], -1).sum())
        count += targets.size
    return total / count / math.log(2)


def lm_fidelity(candidate: DecoderSession, reference: DecoderSession, windows: np.ndarray, *,
                batch: int = 16, decode_after: int | None = None) -> LMFidelity:
    """Bits per byte of both, per-token KL(reference || candidate) and per-token top-1 agreement.

    Teacher-forced in one prefill per window, or with ``decode_after=P`` a prefill of P tokens and then
    one decode step per token (scoring only the decoded predictions): the mode a quantized cache needs.
    """
    windows = np.asarray(windows, dtype=np.int64)
    bits = ref_bits = kl = agree = 0.0
    count = 0
    if decode_after is None:
        first = 1
        streams = (teacher_forced(candidate, windows, batch=batch), teacher_forced(reference, windows, batch=batch))
    else:
        first = decode_after
        streams = (decoded(candidate, windows, prefix=decode_after, batch=batch),
                   decoded(reference, windows, prefix=decode_after, batch=batch))
    for start, logq, logp in zip(range(0, len(windows), batch), *streams):
        targets = windows[start:start + batch, first:, None]
        bits -= float(np.take_along_axis(logq, targets, -1).sum())
        ref_bits -= float(np.take_along_axis(logp, targets, -1).sum())
        kl += float((np.exp(logp) * (logp - logq)).sum())
        agree += float((logq.argmax(-1) == logp.argmax(-1)).sum())
        count += targets.size
    return LMFidelity(bits / count / math.log(2), ref_bits / count / math.log(2), kl / count, agree / count, count)


# --- speed -----------------------------------------------------------------------------------------

def _median_seconds(run: Any, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def decode_step_seconds(session: DecoderSession, *, past_length: int, batch: int = 1, repeats: int = 20) -> float:
    """Median seconds of one decode step (one new token per row) after ``past_length`` cached positions."""
    past = session.random_past(batch, past_length)
    token = np.full((batch, 1), 65, np.int64)
    return _median_seconds(lambda: session.forward(token, past), repeats)


def prefill_seconds(session: DecoderSession, *, length: int, batch: int = 1, repeats: int = 5) -> float:
    """Median seconds of a prefill of ``length`` tokens per row from an empty cache."""
    ids = np.random.default_rng(0).integers(0, session.spec.vocab, (batch, length))
    return _median_seconds(lambda: session.prefill(ids), repeats, warmup=1)


def decoder_latency(reference: DecoderSession, artifact: DecoderSession, *, past: int = 128, prefill: int = 128,
                    rounds: int = 7, decode_repeats: int = 10) -> dict[str, dict[str, Any]]:
    """Decode-step and prefill time of ``artifact`` beside ``reference`` (batch 1), alternating within each
    round: ``{"decode": row, "prefill": row}``, each row with ``fp32_ms``, ``artifact_ms``, ``speedup``
    (= fp32_ms / artifact_ms, medians), ``speedup_band`` (interquartile range of the per-round ratios),
    ``past`` / ``tokens`` and tokens per second. Decode is one token after ``past`` cached positions; both
    lengths are cut to the model's positions. This is the decode-shape timing a latency probe should call
    for decoder layers' formats (one new token, a given past), not prefill shapes."""
    past, prefill = _lengths(reference.spec, past, prefill)
    times: dict[str, dict[str, list[float]]] = {"decode": {"fp32": [], "artifact": []},
                                                "prefill": {"fp32": [], "artifact": []}}
    sessions = {"fp32": reference, "artifact": artifact}
    for index in range(rounds):
        for name in (("fp32", "artifact") if index % 2 == 0 else ("artifact", "fp32")):
            times["decode"][name].append(decode_step_seconds(sessions[name], past_length=past,
                                                             repeats=decode_repeats))
            times["prefill"][name].append(prefill_seconds(sessions[name], length=prefill, repeats=1))
    return _latency_table(times, past, prefill)


def decoder_latency_in_turn(load_reference: Callable[[], DecoderSession], load_artifact: Callable[[], DecoderSession],
                            *, past: int = 128, prefill: int = 128, rounds: int = 7,
                            decode_repeats: int = 10) -> dict[str, dict[str, Any]]:
    """``decoder_latency`` with one session loaded at a time: fp32's rounds, its session released, then the
    artifact's (for models whose two sessions should not be held together: 1.6 GB each at 355 M). The table is
    the same; without alternation, load on a shared machine that changes between the two halves shows in the
    speed-up, so the rounds are reported as they are (``"in_turn": true``)."""
    times: dict[str, dict[str, list[float]]] = {"decode": {"fp32": [], "artifact": []},
                                                "prefill": {"fp32": [], "artifact": []}}
    lengths = (past, prefill)
    for name, load in (("fp32", load_reference), ("artifact", load_artifact)):
        session = load()
        lengths = _lengths(session.spec, past, prefill)
        for _ in range(rounds):
            times["decode"][name].append(decode_step_seconds(session, past_length=lengths[0],
                                                             repeats=decode_repeats))
            times["prefill"][name].append(prefill_seconds(session, length=lengths[1], repeats=1))
        del session
    table = _latency_table(times, *lengths)
    for row in table.values():
        row["in_turn"] = True
    return table


def _lengths(spec: DecoderSpec, past: int, prefill: int) -> tuple[int, int]:
    """``past`` and ``prefill`` cut to the model's positions."""
    limit = spec.max_positions or (past + prefill + 1)
    return max(1, min(past, limit - 1)), max(1, min(prefill, limit))


def _latency_table(times: Mapping[str, Mapping[str, Sequence[float]]], past: int,
                   prefill: int) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for kind, tokens in (("decode", 1), ("prefill", prefill)):
        fp32, got = np.array(times[kind]["fp32"]), np.array(times[kind]["artifact"])
        ratios = fp32 / got
        fp32_ms, got_ms = 1e3 * float(np.median(fp32)), 1e3 * float(np.median(got))
        table[kind] = {"fp32_ms": fp32_ms, "artifact_ms": got_ms, "speedup": fp32_ms / got_ms,
                       "speedup_band": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
                       "tokens": tokens, "past": past if kind == "decode" else 0,
                       "fp32_tokens_per_s": tokens / (fp32_ms / 1e3), "artifact_tokens_per_s": tokens / (got_ms / 1e3)}
    return table


# --- memory ----------------------------------------------------------------------------------------

_MEMORY_PROBE = r"""
import json, sys
import numpy as np, onnxruntime as ort
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
before = rss()
options = ort.SessionOptions(); options.log_severity_level = 3
options.intra_op_num_threads = int(sys.argv[3])
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
spec = json.loads(sys.argv[2])
loaded = rss()
feeds = {spec["input_ids"]: np.zeros((1, 8), np.int64)}
if spec["attention_mask"]:
    feeds[spec["attention_mask"]] = np.ones((1, 8), np.int64)
if spec["position_ids"]:
    feeds[spec["position_ids"]] = np.arange(8, dtype=np.int64)[None, :]
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
for value in session.get_inputs():
    if value.name in spec["past"]:
        dims = [1 if i == 0 else 0 if i == 2 else int(d) if str(d).isdigit() else 1 for i, d in enumerate(value.shape)]
        feeds[value.name] = np.zeros(dims, types.get(value.type, np.float32))
session.run(None, feeds)
after = rss()
print(json.dumps({"session_rss": after["VmRSS"] - before["VmRSS"], "loaded_rss": loaded["VmRSS"] - before["VmRSS"],
                  "peak_rss": after["VmHWM"] - before["VmRSS"]}))
"""


@dataclass(frozen=True)
class SessionMemory:
    """Resident memory an ONNX Runtime session adds to a fresh process (bytes)."""

    session_rss: int  # after loading and one short prefill: what serving the model holds
    loaded_rss: int  # right after the session is created
    peak_rss: int  # high-water mark during load and the first run (initializer folding, pre-packing)


def session_memory(path: str | os.PathLike[str], spec: DecoderSpec, *, threads: int = 1) -> SessionMemory:
    """Measure in a fresh Python process (an in-process delta mixes in whatever this process already freed).

    Linux only: reads ``/proc/self/status``.
    """
    if not Path("/proc/self/status").is_file():
        raise BitpassError("session memory is measured from /proc/self/status: Linux only")
    spec_json = json.dumps({"input_ids": spec.input_ids, "attention_mask": spec.attention_mask,
                            "position_ids": spec.position_ids, "past": spec.all_past})
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), spec_json, str(threads)],
                            capture_output=True, text=True, timeout=900, check=False,
                            env={"ORT_DISABLE_TELEMETRY": "1", **os.environ})
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BitpassError(f"memory probe of {path} failed: {tail[:200]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return SessionMemory(figures["session_rss"], figures["loaded_rss"], figures["peak_rss"])
