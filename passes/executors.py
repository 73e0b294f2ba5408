"""Where bitpass's expensive loops run: in this process, in local worker processes, or on a Ray cluster.

The loops that dominate compile time at real sizes (per-layer output sensitivity, the conformance runner's cases)
are independent tasks over one large shared input (a model and its calibration batches). They all go through
one small interface, so a user chooses where they run with one option (``--executor``) and the passes do not
care:

    results = executor.map(measure_chunk, shared, chunks, on_result=lambda index, result: ...)

``fn(shared, item)`` must be a module-level function (it is pickled by name) and pure: the same ``shared`` and
``item`` give the same result wherever it runs, and ``map`` returns results in the order of ``items``. That is what
makes an artifact compiled with ``--executor ray`` byte-identical to one compiled in one process. On Ray,
``shared`` is put in the object store once per ``map``; local workers receive it with each item, so callers
send a few large chunks rather than many small items.

Specs (``executor_from_spec``):

* ``serial`` (the default): in this process, one item after another.
* ``local`` / ``local:N``: N worker processes on this machine (default: its cores), stdlib
  ``concurrent.futures`` with the ``spawn`` start method (no forked ONNX Runtime or torch thread pools).
* ``ray``: a Ray cluster: the one ``RAY_ADDRESS`` names, else a local one started for this run (``ray.init()``).
  ``ray:ADDRESS`` / ``ray://HOST:PORT`` connect to a running cluster (``ray start --head`` on the head node,
  ``ray start --address=HEAD:6379`` on the others; Ray's client port is 10001). Ray is optional:
  ``pip install 'ray[default]'``.

What Ray ships between processes is pickled by Ray; everything sent is built by bitpass in this run (models,
arrays, options), never read from untrusted pickles.
"""

from __future__ import annotations

import abc
import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bitpass.frontend.cpu import host
from bitpass.frontend.errors import UsageError

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")
OnResult = Callable[[int, Any], None]

EXECUTOR_HELP = ("where the expensive loops run: serial (default, this process), local[:N] (N worker processes), "
                 "ray (RAY_ADDRESS's cluster, else a local one), ray://HOST:PORT")


class Executor(abc.ABC):
    """Runs ``fn(shared, item)`` for every item; results in item order, whatever order they finish in."""

    #: how many tasks run at once
    workers: int = 1
    spec: str = "serial"
    #: whether every task runs on this machine (it may then read files the caller wrote, instead of being sent
    #: their bytes); a Ray cluster this executor did not start may be elsewhere
    local: bool = True

    @abc.abstractmethod
    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *,
            on_result: OnResult | None = None) -> list[R]:
        """``[fn(shared, item) for item in items]``; ``on_result(index, result)`` is called as each finishes."""

    def close(self) -> None:
        """Release workers (a Ray cluster this executor started is shut down)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, workers={self.workers})"


class SerialExecutor(Executor):
    """Everything in this process, in order: the default, and the reference the others must equal."""

    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *,
            on_result: OnResult | None = None) -> list[R]:
        results = []
        for index, item in enumerate(items):
            results.append(fn(shared, item))
            if on_result is not None:
                on_result(index, results[-1])
        return results


class ProcessExecutor(Executor):
    """Worker processes on this machine (``concurrent.futures``, ``spawn``), started at the first ``map`` and kept
    until ``close``: a worker imports bitpass once, not once per call."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or host().cores)
        self.spec = f"local:{self.workers}"
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *,
            on_result: OnResult | None = None) -> list[R]:
        if not items:
            return []
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers,
                                                                mp_context=multiprocessing.get_context("spawn"))
        results: list[Any] = [None] * len(items)
        futures = {self._pool.submit(_call_remote, fn, shared, item): index for index, item in enumerate(items)}
        try:
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                if on_result is not None:
                    on_result(index, results[index])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Tasks on a Ray cluster: ``shared`` is put in the object store once; each task takes one CPU slot."""

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as err:
            raise UsageError("--executor ray needs Ray: pip install 'ray[default]' (or use --executor local)") from err
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            options: dict[str, Any] = {"address": address, "log_to_driver": False, "configure_logging": False}
            if address is None:  # a local cluster for this run: no dashboard, no usage reporting
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                options |= {"include_dashboard": False, "num_cpus": host().cores}
            try:
                ray.init(**options)
            except ConnectionError as err:
                raise UsageError(f"cannot reach the Ray cluster at {address}: {err}") from err
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.spec = f"ray:{address}" if address else "ray"
        self.local = self._started and address is None
        self._remote = ray.remote(num_cpus=1)(_call_remote)

    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *,
            on_result: OnResult | None = None) -> list[R]:
        ray = self._ray
        if not items:
            return []
        shared_ref = ray.put(shared)
        pending = {self._remote.remote(fn, shared_ref, item): index for index, item in enumerate(items)}
        results: list[Any] = [None] * len(items)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = ray.get(ref)
                if on_result is not None:
                    on_result(index, results[index])
        return results

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def _call_remote(fn: Callable[[Any, Any], Any], shared: Any, item: Any) -> Any:
    return fn(shared, item)


SERIAL = SerialExecutor()


def executor_from_spec(spec: str | Executor | None) -> Executor:
    """``serial``, ``local``, ``local:N``, ``ray``, ``ray:ADDRESS`` or ``ray://HOST:PORT`` (see the module doc)."""
    if isinstance(spec, Executor):
        return spec
    text = (spec or "serial").strip()
    kind, _, rest = text.partition(":")
    if kind == "serial" and not rest:
        return SERIAL
    if kind == "local":
        if not rest:
            return ProcessExecutor()
        if rest.isdigit() and int(rest) > 0:
            return ProcessExecutor(int(rest))
        raise UsageError(f"--executor {text}: the worker count must be a positive integer, as in local:2")
    if kind == "ray":
        if text.startswith("ray://"):
            return RayExecutor(text)
        return RayExecutor(rest or None)
    raise UsageError(f"--executor {text!r}: use serial, local, local:N, ray, ray:ADDRESS or ray://HOST:PORT")

