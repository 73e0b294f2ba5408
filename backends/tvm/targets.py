"""Named TVM targets: a TVM target dict, the C compiler that links the library, and CPU features.

Schedules are chosen by *features* (``avx2``, ``avx512``, ``vnni``, ``neon``, ``dotprod``), not by
target name, in the style of dlight's rules. TVM 0.27 takes targets as dicts (string targets are
rejected; NOTES.md), and ``mcpu=native`` silently falls back to generic, so every target names its
triple and CPU explicitly.
"""

from __future__ import annotations

import functools
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bitpass.frontend import cpu


@dataclass(frozen=True)
class TargetSpec:
    """One named target."""

    name: str
    description: str
    triple: str
    mcpu: str
    mattr: tuple[str, ...]
    features: frozenset[str]
    #: the gcc that links model.so; None means the host's default compiler
    cross_compiler: str | None = None
    #: fp32 lanes in one vector register (drives vectorization widths)
    vector_lanes: int = 8
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    def tvm_dict(self) -> dict[str, Any]:
        target: dict[str, Any] = {"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu}
        if self.mattr:
            target["mattr"] = list(self.mattr)
        target["num-cores"] = 1  # threads come from the runtime's pool, not from codegen
        target.update(self.extra)
        return target

    def tvm_target(self):  # -> tvm.target.Target
        import tvm

        return tvm.target.Target(self.tvm_dict())

    def is_host_runnable(self) -> bool:
        """Whether a library for this target runs natively here (same architecture and features)."""
        machine = platform.machine().lower()
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
        return arch == self.arch and self.features <= host_features()

    def compiler_available(self) -> bool:
        return self.cross_compiler is None or shutil.which(self.cross_compiler) is not None


TARGETS: dict[str, TargetSpec] = {
    "x86-64-avx2": TargetSpec(
        "x86-64-avx2", "x86-64 with AVX2 and FMA (Haswell / Zen and later)",
        "x86_64-linux-gnu", "haswell", ("+avx2", "+fma"), frozenset({"avx2", "fma"}), vector_lanes=8),
    "x86-64-avx512": TargetSpec(
        "x86-64-avx512", "x86-64 with AVX-512 and VNNI (Cascade Lake / Zen 4 and later)",
        "x86_64-linux-gnu", "cascadelake", ("+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni", "+fma"),
        frozenset({"avx2", "fma", "avx512", "vnni"}), vector_lanes=16),
    "aarch64-neon": TargetSpec(
        "aarch64-neon", "ARM64 with NEON (Cortex-A53/A72, Raspberry Pi 3/4)",
        "aarch64-linux-gnu", "cortex-a72", ("+neon",), frozenset({"neon"}),
        cross_compiler="aarch64-linux-gnu-gcc", vector_lanes=4),
    "aarch64-dotprod": TargetSpec(
        "aarch64-dotprod", "ARM64 with NEON and the dot-product extension (Cortex-A76, Neoverse N1, Pi 5)",
        "aarch64-linux-gnu", "neoverse-n1", ("+neon", "+dotprod"), frozenset({"neon", "dotprod"}),
        cross_compiler="aarch64-linux-gnu-gcc", vector_lanes=4),
}


def _cpuinfo_flags(text: str) -> set[str]:
    """The feature flags of a ``/proc/cpuinfo`` text (``frontend.cpu.parse_cpuinfo``)."""
    return set(cpu.parse_cpuinfo(text)[1])


@functools.cache
def host_features() -> frozenset[str]:
    """Features of this machine's CPU, in the vocabulary of ``TargetSpec.features``."""
    flags = set(cpu.host().flags)
    found = set()
    if "avx2" in flags:
        found.add("avx2")
    if "fma" in flags:
        found.add("fma")
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        found.add("avx512")
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        found.add("vnni")
    if "asimd" in flags:
        found.add("neon")
    if "asimddp" in flags:
        found.add("dotprod")
    return frozenset(found)


def host_target() -> str:
    """The best named target that runs natively on this machine."""
    machine = platform.machine().lower()
    features = host_features()
    if machine in ("aarch64", "arm64"):
        return "aarch64-dotprod" if "dotprod" in features else "aarch64-neon"
    if {"avx512", "vnni"} <= features:
        return "x86-64-avx512"
    return "x86-64-avx2"


def get(name: str) -> TargetSpec:
    return TARGETS[name]
