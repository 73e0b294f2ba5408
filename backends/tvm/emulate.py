"""Run an aarch64 artifact under qemu-user with an arm64 Python and TVM runtime (tools/setup_arm64.sh).

Emulated timings mean nothing (NOTES.md): this checks outputs only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitpass.frontend.errors import BitpassError

SETUP = "tools/setup_arm64.sh"


def cache_root() -> Path:
    return Path(os.environ.get("BITPASS_ARM64_ROOT", Path.home() / ".cache" / "bitpass" / "arm64"))


@dataclass(frozen=True)
class Toolchain:
    qemu: str
    sysroot: Path
    site: Path

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"


def find_toolchain() -> tuple[Toolchain | None, str]:
    """The emulation toolchain, or None and why it is missing."""
    root = cache_root()
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        return None, f"qemu-aarch64 is not installed (apt-get install qemu-user, or run {SETUP})"
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        return None, f"the aarch64 cross compiler is not installed (apt-get install gcc-aarch64-linux-gnu, or {SETUP})"
    chain = Toolchain(qemu, root / "sysroot", root / "site")
    if not chain.python.exists():
        return None, f"no arm64 Python under {chain.sysroot} (run {SETUP})"
    if not (chain.site / ".complete").exists():
        return None, f"no arm64 TVM runtime under {chain.site} (run {SETUP})"
    return chain, ""


def run(directory: Path, feeds: Mapping[str, np.ndarray], output_names: list[str], *,
        timeout: float = 600) -> list[np.ndarray]:
    """Outputs of the artifact in ``directory`` (its tvm_run.py and model.so) run under qemu-aarch64."""
    chain, why = find_toolchain()
    if chain is None:
        raise BitpassError(f"cannot emulate aarch64: {why}")
    with tempfile.TemporaryDirectory(prefix="bitpass-qemu-") as tmp:
        inputs, outputs = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(inputs, **{k: np.asarray(v) for k, v in feeds.items()})
        env = {**os.environ, "PYTHONPATH": str(chain.site), "PYTHONHOME": str(chain.sysroot / "usr"),
               "QEMU_LD_PREFIX": str(chain.sysroot), "PYTHONDONTWRITEBYTECODE": "1", "TVM_NUM_THREADS": "1"}
        command = [chain.qemu, "-cpu", "neoverse-n1", "-L", str(chain.sysroot), str(chain.python),
                   str(Path(directory) / "tvm_run.py"), str(directory), str(inputs), str(outputs)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise BitpassError(f"the aarch64 run under qemu failed ({done.returncode}): {' | '.join(tail)}")
        with np.load(outputs) as data:
            return [data[n] for n in output_names]
