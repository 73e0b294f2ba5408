"""Watching child processes (``bitpass.tools.processes``): a tree's resident memory, and killing its group."""

from __future__ import annotations

import subprocess
import sys
import time

from bitpass.tools.processes import kill_group, tree_rss_mb

#: a child that starts, from a second thread, a grandchild holding 200 MB, then waits
_PARENT = """
import subprocess, sys, threading, time
grandchild = "b = bytearray(200 << 20); import time; time.sleep(60)"
threading.Thread(target=lambda: subprocess.run([sys.executable, "-c", grandchild])).start()
time.sleep(60)
"""


def test_a_tree_counts_descendants_started_from_any_thread_and_its_group_is_killed():
    child = subprocess.Popen([sys.executable, "-c", _PARENT], start_new_session=True)
    try:
        total, own = 0.0, 0.0
        for _ in range(100):
            total, own = tree_rss_mb(child.pid)
            if total - own > 190:
                break
            time.sleep(0.1)
        assert 0 < own < total and total - own > 190
    finally:
        kill_group(child.pid)
        child.wait(timeout=10)
    assert tree_rss_mb(child.pid) == (0.0, 0.0)
    kill_group(child.pid)  # gone already: nothing raised
