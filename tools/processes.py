"""Child processes the benchmarks and the conformance runner watch: their resident memory and how they are killed."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """Resident memory of ``pid`` and all its descendants (timing subprocesses, workers), and of ``pid`` alone, in
    MiB; (0, 0) once it is gone. Descendants are found by parent id over /proc, so children started from any of
    its threads count (a thread's ``task/*/children`` list names only its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    total, own, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    if current == pid:
                        own = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1024, own / 1024


def private_rss_mb(pid: int) -> float:
    """Anonymous resident memory of ``pid`` in MiB (``RssAnon``: what no file backs, so what a process holds as its
    own copies; memory-mapped weights it has read are file pages the kernel can drop, counted in ``VmRSS`` only);
    0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (started with ``start_new_session=True``); gone already is fine."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


__all__ = ["kill_group", "private_rss_mb", "tree_rss_mb"]
