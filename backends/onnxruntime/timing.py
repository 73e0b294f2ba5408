"""Timing ONNX models with ONNX Runtime in a fresh process, alternating, and what CPU they were timed on.

Timings taken in a process where torch (or anything else with its own thread pool) has run are 1.5-3x
higher and erratic (NOTES.md), so every timing bitpass makes to *choose* something runs here, in a
child process that imports only numpy and ONNX Runtime. A job is a list of groups; the models of one
group are timed against each other: each round runs every model of the group in turn (the order
reversed every other round), after a warm-up, with thread spinning off so that one session's idle
threads do not steal the next one's cores. The result is every round's seconds per call, so callers
take medians of *paired* ratios (a model against the reference of its own round), which cancels
most of the drift of a shared machine. A round's seconds per call are the mean over its calls, or
with ``per_round="median"`` the median of the calls timed one by one: a call the scheduler preempted
(on a busy 2-core machine a 0.3 ms model's round of 20 ms is often cut) then does not move the round.

    python .../bitpass/backends/onnxruntime/timing.py JOB_DIR   # what time_groups runs (imports numpy and ORT only)

What CPU a timing ran on is ``bitpass.frontend.cpu.host()`` (keyed by its features, not its model name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: environment of the timing process: single-threaded BLAS/OpenMP libraries (ORT has its own pool)
QUIET_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Group:
    """Models timed against each other on the same inputs, at each batch size of ``feeds``."""

    models: dict[str, bytes | Path]
    #: batch size -> {input name: array}
    feeds: dict[int, dict[str, np.ndarray]]
    #: filled in by ``time_groups``: name -> batch -> seconds per call in each round
    samples: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    #: name -> why it could not be timed (session creation or a run failed)
    errors: dict[str, str] = field(default_factory=dict)
    #: name -> ONNX Runtime graph optimizers its session turns off (a session option timed as a candidate)
    disabled_optimizers: dict[str, list[str]] = field(default_factory=dict)

    def median(self, name: str, batch: int) -> float | None:
        rounds = self.samples.get(name, {}).get(batch)
        return float(np.median(rounds)) if rounds else None

    def ratio(self, name: str, reference: str, batch: int) -> float | None:
        """Median over rounds of ``reference``'s seconds / ``name``'s (> 1: ``name`` is faster)."""
        mine, theirs = self.samples.get(name, {}).get(batch), self.samples.get(reference, {}).get(batch)
        if not mine or not theirs:
            return None
        n = min(len(mine), len(theirs))
        return float(np.median(np.array(theirs[:n]) / np.array(mine[:n])))


def time_groups(groups: Sequence[Group], *, threads: int = 0, rounds: int = 9, min_seconds: float = 0.02,
                budget_seconds: float | None = None, fresh_process: bool = True, timeout: float = 3600.0,
                per_round: str = "mean") -> None:
    """Time every group (fills ``group.samples`` / ``group.errors``), in a fresh process by default.

    ``rounds`` is the most rounds per group and batch (at least 3 are run); ``budget_seconds`` caps the
    time spent per group and batch after the first 3 rounds. ``threads`` 0 means ONNX Runtime's default.
    ``per_round``: a round's seconds per call are the ``mean`` of its calls or their ``median``."""
    if per_round not in ("mean", "median"):
        raise ValueError(f"per_round is 'mean' or 'median', not {per_round!r}")
    options = {"threads": threads, "rounds": rounds, "min_seconds": min_seconds, "budget_seconds": budget_seconds,
               "per_round": per_round}
    with tempfile.TemporaryDirectory(prefix="bitpass-timing-") as tmp:
        folder = Path(tmp)
        job = {"options": options, "groups": []}
        for g, group in enumerate(groups):
            names = {}
            for m, (name, model) in enumerate(group.models.items()):
                if isinstance(model, Path):
                    names[name] = str(model)
                else:
                    path = folder / f"g{g}_m{m}.onnx"
                    path.write_bytes(model)
                    names[name] = str(path)
            feeds = {}
            for batch, arrays in group.feeds.items():
                path = folder / f"g{g}_b{batch}.npz"
                np.savez(path, **arrays)
                feeds[str(batch)] = str(path)
            job["groups"].append({"models": names, "feeds": feeds,
                                  "disabled_optimizers": {n: list(v) for n, v in group.disabled_optimizers.items()}})
        (folder / "job.json").write_text(json.dumps(job))
        if fresh_process:
            # telemetry off unless the user turned it on (ORT writes under HOME and TMPDIR otherwise)
            env = {"ORT_DISABLE_TELEMETRY": "1", **os.environ, **QUIET_ENV}
            # run as a file, not ``-m``: the package's imports (onnx-ir, sympy...) would cost seconds per call
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(folder)],
                                  capture_output=True, text=True, env=env, timeout=timeout, check=False)
            if done.returncode != 0 or not (folder / "result.json").is_file():
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"the timing process failed (exit {done.returncode}): {tail}")
        else:
            run_job(folder)
        result = json.loads((folder / "result.json").read_text())
    for group, got in zip(groups, result["groups"]):
        group.samples = {name: {int(b): v for b, v in per.items()} for name, per in got["samples"].items()}
        group.errors = dict(got["errors"])


def run_job(folder: Path) -> None:
    """The child's side: load each group's sessions, time them alternately, write result.json."""
    import onnxruntime as ort

    job = json.loads((folder / "job.json").read_text())
    opts = job["options"]
    out = []
    for spec in job["groups"]:
        sessions, errors = {}, {}
        for name, path in spec["models"].items():
            try:
                options = _session_options(ort, opts["threads"], spec.get("disabled_optimizers", {}).get(name))
                sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            except Exception as err:  # ORT raises its own types; the model is reported, the rest still timed
                errors[name] = _first_line(err)
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in sessions}
        for batch, path in spec["feeds"].items():
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            live = {}
            for name, session in sessions.items():
                if name in errors:
                    continue
                feeds = {i.name: arrays[i.name] for i in session.get_inputs() if i.name in arrays}
                try:
                    for _ in range(2):
                        session.run(None, feeds)
                    live[name] = feeds
                except Exception as err:
                    errors[name] = _first_line(err)
            for name, rounds in _alternate({n: sessions[n] for n in live}, live, opts).items():
                samples[name][batch] = rounds
        out.append({"samples": {n: s for n, s in samples.items() if s}, "errors": errors})
    (folder / "result.json").write_text(json.dumps({"groups": out}))


def _alternate(sessions: Mapping[str, Any], feeds: Mapping[str, Mapping[str, np.ndarray]],
               opts: Mapping[str, Any]) -> dict[str, list[float]]:
    calls = {}
    for name, session in sessions.items():
        start = time.perf_counter()
        session.run(None, feeds[name])
        calls[name] = max(1, int(opts["min_seconds"] / max(time.perf_counter() - start, 1e-7)))
    rounds: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    by_median = opts.get("per_round") == "median"
    started = time.perf_counter()
    for r in range(max(3, int(opts["rounds"]))):
        if r >= 3 and opts.get("budget_seconds") and time.perf_counter() - started > opts["budget_seconds"]:
            break
        for name in (names if r % 2 == 0 else names[::-1]):
            session, feed, n = sessions[name], feeds[name], calls[name]
            if by_median:
                each = []
                for _ in range(n):
                    start = time.perf_counter()
                    session.run(None, feed)
                    each.append(time.perf_counter() - start)
                rounds[name].append(float(np.median(each)))
                continue
            start = time.perf_counter()
            for _ in range(n):
                session.run(None, feed)
            rounds[name].append((time.perf_counter() - start) / n)
    return rounds


def _session_options(ort: Any, threads: int, disabled: Sequence[str] | None = None) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if disabled:  # as passes.execution.session_options does for an artifact's session.json (ORT splits on ";")
        options.add_session_config_entry("optimization.disable_specified_optimizers", ";".join(disabled))
    return options


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bitpass.backends.onnxruntime.timing JOB_DIR", file=sys.stderr)
        return 2
    run_job(Path(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Group", "run_job", "time_groups"]
