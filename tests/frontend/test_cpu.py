"""bitpass.frontend.cpu: one reader of the CPU's name, flags, cores and caches, and the key timings are cached by."""

from __future__ import annotations

import os
from pathlib import Path

from bitpass.frontend import cpu

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes crc32 asimddp
CPU implementer\t: 0x41

Hardware\t: BCM2835
Model\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_cpuinfo_gives_the_first_processors_name_and_sorted_flags():
    model, flags = cpu.parse_cpuinfo(X86)
    assert model == "AMD EPYC 9R14 96-Core Processor"
    assert flags == tuple(sorted(flags)) and "avx512_vnni" in flags and "avx512_bf16" in flags


def test_arm_cpuinfo_reads_features_and_a_model_line():
    model, flags = cpu.parse_cpuinfo(ARM)
    assert model == "BCM2835"
    assert {"asimd", "asimddp"} <= set(flags)


def test_kernel_flags_keep_only_the_flags_kernels_depend_on_in_a_fixed_order():
    _, flags = cpu.parse_cpuinfo(X86)
    found = cpu.Cpu("x", "x86_64", 2, flags).kernel_flags
    assert found == tuple(f for f in cpu.KERNEL_FLAGS if f in flags)
    assert "fpu" not in found and {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"} <= set(found)


def test_the_timing_key_depends_on_flags_and_architecture_not_on_the_name_or_cores():
    _, flags = cpu.parse_cpuinfo(X86)
    one = cpu.Cpu("AMD EPYC", "x86_64", 2, flags)
    assert one.key == cpu.Cpu("another name", "x86_64", 64, flags).key
    assert one.key != cpu.Cpu("AMD EPYC", "x86_64", 2, tuple(f for f in flags if f != "avx512_vnni")).key
    assert one.key != cpu.Cpu("AMD EPYC", "aarch64", 2, flags).key


def test_sysfs_caches_skip_instruction_caches_and_read_sizes(tmp_path: Path):
    for index, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "1024K"), (3, "Unified", "32M")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    caches = cpu.read_caches(tmp_path)
    assert caches == {"L1": 32 << 10, "L2": 1 << 20, "L3": 32 << 20}
    assert cpu.Cpu("x", "x86_64", 1, (), caches).last_level_cache == 32 << 20
    assert cpu.read_caches(tmp_path / "missing") == {}


def test_the_host_line_names_the_cpu_its_flags_and_cores():
    host = cpu.host()
    assert host is cpu.host()  # read once per process
    assert host.cores == len(os.sched_getaffinity(0))
    line = host.describe()
    assert line.startswith(f"CPU: {host.model}") and f"{host.cores} cores" in line
    for flag in host.kernel_flags:
        assert flag in line
    if Path("/proc/cpuinfo").exists():
        assert host.flags == cpu.parse_cpuinfo(Path("/proc/cpuinfo").read_text())[1]
    assert host.as_dict()["key"] == host.key
