"""This machine's CPU: model name, architecture, cores, feature flags, caches, and a key for cached timings.

One reader of ``/proc/cpuinfo`` and sysfs for everything that depends on the CPU: benchmarks print
``host().describe()`` beside every table (a figure means little without the CPU it came from; the same
machine kind has come with AVX2 only and with AVX-512 VNNI), cached timings are keyed by ``host().key``
(architecture and feature flags, never the model name), and target detection reads ``host().flags``.
Standard library only, so any layer (and a timing child process) can import it cheaply.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

#: flags the int8 / fp32 kernels of ONNX Runtime and TVM depend on (x86 and ARM): printed beside tables
KERNEL_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp",
                "i8mm", "sve")
#: ``/proc/cpuinfo`` keys naming the CPU (x86: "model name"; ARM kernels: "Model" or "Hardware")
_MODEL_KEYS = ("model name", "Model", "Hardware")
#: keys holding the feature flags (x86: "flags"; ARM: "Features")
_FLAG_KEYS = ("flags", "Features")
_CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(frozen=True)
class Cpu:
    """A CPU as timings and kernels depend on it."""

    model: str
    arch: str
    #: logical CPUs this process may run on
    cores: int
    #: every feature flag, sorted
    flags: tuple[str, ...]
    #: data and unified caches of one core: ``{"L1": bytes, "L2": bytes, "L3": bytes}``
    caches: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def kernel_flags(self) -> tuple[str, ...]:
        """The flags of ``KERNEL_FLAGS`` this CPU has, in that order."""
        return tuple(f for f in KERNEL_FLAGS if f in self.flags)

    @property
    def key(self) -> str:
        """What cached timings are keyed by: the architecture and every feature flag, not the model name
        (one model name has come with different flags under virtualization)."""
        return hashlib.sha256(json.dumps([self.arch, sorted(self.flags)]).encode()).hexdigest()[:16]

    @property
    def last_level_cache(self) -> int | None:
        """Bytes of the largest cache read, or None where sysfs gave none."""
        return max(self.caches.values(), default=None)

    def describe(self) -> str:
        """One line for above a benchmark's table: model, architecture, cores, kernel flags and caches."""
        flags = " ".join(self.kernel_flags) or "no SIMD flags read"
        caches = ", ".join(f"{name} {size >> 10} KiB" for name, size in self.caches.items())
        return f"CPU: {self.model} ({self.arch}), {self.cores} cores; flags: {flags}" + (f"; {caches}" if caches else "")

    def as_dict(self) -> dict[str, object]:
        """For JSON reports: model, arch, cores, kernel flags, caches and key."""
        return {"model": self.model, "arch": self.arch, "cores": self.cores, "flags": list(self.kernel_flags),
                "caches": dict(self.caches), "key": self.key}


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(model name, sorted flags) from the text of ``/proc/cpuinfo``: the first processor's entries."""
    model, flags = "", ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in _MODEL_KEYS and not model:
            model = value.strip()
        elif key in _FLAG_KEYS and not flags:
            flags = tuple(sorted(set(value.split())))
    return model, flags


def _size_bytes(size: str) -> int:
    """sysfs cache sizes: "32K", "1024K", "32768K", "1M" or plain bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size and size[-1] in units else int(size)


def read_caches(root: Path = _CACHE_ROOT) -> dict[str, int]:
    """``{"L1": bytes, ...}`` for the data and unified caches under a sysfs ``cpuN/cache`` folder."""
    caches: dict[str, int] = {}
    for index in sorted(root.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            caches[f"L{(index / 'level').read_text().strip()}"] = _size_bytes((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
    return caches


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def host() -> Cpu:
    """This machine's CPU (read once per process)."""
    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = "", ()
    return Cpu(model or platform.processor() or platform.machine(), platform.machine(), _cores(), flags,
               read_caches())


__all__ = ["KERNEL_FLAGS", "Cpu", "host", "parse_cpuinfo", "read_caches"]
