"""Executors: where the expensive loops run. Every executor returns what the serial loop returns, in item order,
so the artifact does not depend on where the work ran."""

from __future__ import annotations

import operator

import numpy as np
import pytest

from bitpass.frontend.errors import UsageError
from bitpass.passes.executors import SERIAL, ProcessExecutor, SerialExecutor, executor_from_spec


def test_serial_is_the_default_and_runs_in_order():
    assert executor_from_spec(None) is SERIAL and executor_from_spec("serial") is SERIAL
    seen = []
    assert SERIAL.map(operator.mul, 3, [1, 2, 5], on_result=lambda i, r: seen.append((i, r))) == [3, 6, 15]
    assert seen == [(0, 3), (1, 6), (2, 15)]


def test_worker_processes_return_the_serial_results_in_item_order():
    shared = np.arange(12, dtype=np.float64).reshape(3, 4)
    items = [np.full((4,), k, dtype=np.float64) for k in range(7)]
    finished = []
    with executor_from_spec("local:2") as executor:
        assert isinstance(executor, ProcessExecutor) and executor.workers == 2
        got = executor.map(np.dot, shared, items, on_result=lambda i, _: finished.append(i))
    want = SerialExecutor().map(np.dot, shared, items)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert sorted(finished) == list(range(7))
    assert ProcessExecutor(2).map(np.dot, shared, []) == []


@pytest.mark.parametrize("spec", ["local:0", "local:two", "threads", "serial:3"])
def test_a_wrong_spec_says_what_to_write(spec):
    with pytest.raises(UsageError, match="local:2|serial, local"):
        executor_from_spec(spec)



def test_serial_and_worker_processes_say_their_tasks_run_on_this_machine():
    # a task may then read files the caller wrote instead of being sent their bytes (output sensitivity does)
    assert SERIAL.local and ProcessExecutor(2).local
