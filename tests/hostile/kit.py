"""The hostile corpus's kit: a sandbox per case, the real CLI in a subprocess, and one promise checker.

The promise, for every bad input: ONE line on stderr naming the cause (under 300 characters, no
traceback), a non-zero exit status, no half-written artifact or temporary directory left, nothing
outside the working folder written or read, and the user's files as they were.

Each case gets a ``Sandbox``: ``work/`` (the current directory, holding the user's files),
``outside/`` (a folder beside it with a canary file of distinctive bytes: a hostile input that
makes bitpass read it would carry those bytes into an output, a log or a message), and private
``home/``, ``cache/`` and ``tmp/`` folders given as HOME, BITPASS_CACHE_DIR and TMPDIR, so
temporary leftovers show. A snapshot of every file (type, bytes, mtime, sha256) is taken before
the command and compared after it.

Commands run through a fork server (``_zygote.py``): each is still its own process, started like
the ``bitpass`` console script, but without paying the imports again. ``fresh=True`` starts the
real console script instead (cases that race two processes, signals, the test-only pause hook,
planted modules on the path).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BITPASS = Path(sys.executable).parent / "bitpass"
ZYGOTE = Path(__file__).with_name("_zygote.py")

#: the test-only hook (read in one place, backends/artifact.py): when set, bitpass stops itself with
#: SIGSTOP right before it re-checks the destination and renames the staged artifact into place
PAUSE_HOOK = "BITPASS_TEST_PAUSE_BEFORE_PUBLISH"

#: how progress lines begin (they are not part of the error report)
PROGRESS = "[bitpass] "
#: at most this many characters on the one error line
MAX_LINE = 300
#: names that mark a half-written artifact, a swapped-out old one, or a partial output file
LEFTOVER_PATTERNS = ("*.partial", "*.partial.*", "*.partial-*", ".*.old-*", "*.old-*", "*.tmp")
#: what bitpass may leave in TMPDIR: log files (``*.log``) holding the traceback behind a one-line error
LOG_SUFFIX = ".log"
#: the canary: float32 bytes no model, data file or message would contain by chance
CANARY = (np.arange(64, dtype=np.float32) * np.float32(0.0625) + np.float32(31337.0)).astype("<f4")
CANARY_BYTES = CANARY.tobytes()


# --- running the CLI ----------------------------------------------------------


@dataclass
class Result:
    argv: list[str]
    status: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def describe(self) -> str:
        return (f"bitpass {' '.join(self.argv)}\n-> exit {self.status}{' (TIMED OUT)' if self.timed_out else ''} "
                f"in {self.seconds:.1f}s\n--- stderr ---\n{self.stderr[-3000:]}\n--- stdout ---\n{self.stdout[-1500:]}")


class Zygote:
    """A running ``_zygote.py``: ``run()`` forks one bitpass process per call."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd="/")
        ready = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not ready:
            raise RuntimeError("the hostile corpus's fork server did not start")

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the hostile corpus's fork server died")
        return json.loads(reply)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Process:
    """A running bitpass process: its pid, and ``finish()`` for its result."""

    argv: list[str]
    pid: int

    def finish(self, timeout: float = 120) -> Result:
        raise NotImplementedError

    def exited(self) -> bool:
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


class ForkedProcess(Process):
    """A child of the fork server (the server reaps it: ``finish`` asks the server)."""

    def __init__(self, argv: list[str], pid: int, zygote: Zygote, out: Path, err: Path) -> None:
        self.argv, self.pid, self.zygote, self.out, self.err = argv, pid, zygote, out, err
        self.result: Result | None = None

    def exited(self) -> bool:
        return process_state(self.pid) in ("", "Z", "X")

    def finish(self, timeout: float = 120) -> Result:
        if self.result is None:
            reply = self.zygote.run({"op": "wait", "pid": self.pid, "timeout": timeout})
            self.result = Result(self.argv, reply["status"], self.out.read_text(errors="replace"),
                                 self.err.read_text(errors="replace"), reply["seconds"], reply["timed_out"])
            for path in (self.out, self.err):
                path.unlink(missing_ok=True)
        return self.result


class FreshProcess(Process):
    """The real console script in a new process."""

    def __init__(self, argv: list[str], proc: subprocess.Popen[str]) -> None:
        self.argv, self.proc, self.pid = argv, proc, proc.pid
        self.start = time.monotonic()
        self.result: Result | None = None

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def finish(self, timeout: float = 120) -> Result:
        if self.result is None:
            try:
                stdout, stderr = self.proc.communicate(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                stdout, stderr = self.proc.communicate()
                timed_out = True
            self.result = Result(self.argv, self.proc.returncode, stdout, stderr, time.monotonic() - self.start,
                                 timed_out)
        return self.result


# --- the sandbox ----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "dir", "link", "other"
    size: int
    mtime_ns: int
    digest: str  # sha256 of a file, the target of a link


def _entry(path: Path) -> Entry:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return Entry("link", 0, info.st_mtime_ns, os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return Entry("dir", 0, info.st_mtime_ns, "")
    if stat.S_ISREG(info.st_mode):
        try:
            digest = _file_digest(path, info.st_size)
        except PermissionError:
            digest = "unreadable"
        return Entry("file", info.st_size, info.st_mtime_ns, digest)
    return Entry("other", 0, info.st_mtime_ns, "")


#: files above this size (the sparse gigabytes some cases plant) are hashed by their ends, and not scanned
BIG_FILE = 32 << 20


def _file_digest(path: Path, size: int) -> str:
    with path.open("rb") as handle:
        if size <= BIG_FILE:
            return hashlib.sha256(handle.read()).hexdigest()
        digest = hashlib.sha256(handle.read(1 << 20))
        handle.seek(size - (1 << 20))
        digest.update(handle.read())
        return f"{digest.hexdigest()}:{size}"


def snapshot(root: Path) -> dict[str, Entry]:
    """Every entry under ``root`` (links not followed), by path relative to ``root``."""
    found: dict[str, Entry] = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = _entry(path)
    return found


class Sandbox:
    """One case's folders; ``run`` executes ``bitpass ARGV`` in ``work/`` and records a before-snapshot."""

    def __init__(self, root: Path, zygote: Zygote | None) -> None:
        self.root = root
        self.work = root / "work"
        self.outside = root / "outside"
        self.home = root / "home"
        self.cache = root / "cache"
        self.tmp = root / "tmp"
        for folder in (self.work, self.outside, self.home, self.cache, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.canary = self.outside / "secret.bin"
        self.canary.write_bytes(CANARY_BYTES)
        (self.outside / "notes.txt").write_text("the user's notes, outside the working folder\n")
        self.zygote = zygote
        self._spawned = 0
        self.before: dict[str, dict[str, Entry]] = {}
        self.results: list[Result] = []

    # -- environment
    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONHASHSEED")}
        env = {**keep, "HOME": str(self.home), "TMPDIR": str(self.tmp), "BITPASS_CACHE_DIR": str(self.cache),
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
        env.update(extra or {})
        return env

    def take_snapshot(self) -> None:
        self.before = {name: snapshot(getattr(self, name)) for name in ("work", "outside", "home", "tmp")}

    # -- running
    def run(self, *argv: str | os.PathLike[str], env: Mapping[str, str] | None = None, fresh: bool = False,
            timeout: float = 120, rlimits: Mapping[str, int] | None = None, snapshot_first: bool = True) -> Result:
        """Run ``bitpass ARGV`` in work/ to the end (a snapshot of the sandbox is taken first)."""
        if snapshot_first:
            self.take_snapshot()
        result = self.spawn(*argv, env=env, fresh=fresh, rlimits=rlimits).finish(timeout)
        self.results.append(result)
        return result

    def spawn(self, *argv: str | os.PathLike[str], env: Mapping[str, str] | None = None, fresh: bool = False,
              rlimits: Mapping[str, int] | None = None) -> Process:
        """Start ``bitpass ARGV`` in work/ and return at once: a forked child of the fork server, or
        (``fresh``, or no server) the real console script."""
        args = [str(a) for a in argv]
        if fresh or self.zygote is None:
            return FreshProcess(args, self.popen(*args, env=env, rlimits=rlimits))
        self._spawned += 1
        out, err = self.root / f"stdout-{self._spawned}.txt", self.root / f"stderr-{self._spawned}.txt"
        reply = self.zygote.run({"op": "spawn", "argv": args, "cwd": str(self.work), "env": self.env(env),
                                 "stdout": str(out), "stderr": str(err), "rlimits": dict(rlimits or {})})
        return ForkedProcess(args, reply["pid"], self.zygote, out, err)

    def popen(self, *argv: str | os.PathLike[str], env: Mapping[str, str] | None = None,
              rlimits: Mapping[str, int] | None = None) -> subprocess.Popen[str]:
        """The real ``bitpass`` console script, started in ``work/`` (its own process group)."""
        import resource

        def limit() -> None:
            for name, soft in (rlimits or {}).items():
                which = getattr(resource, name)
                resource.setrlimit(which, (soft, resource.getrlimit(which)[1]))

        return subprocess.Popen([str(BITPASS), *[str(a) for a in argv]], cwd=self.work, env=self.env(env),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=limit if rlimits else None)

    # -- the promise
    def leftovers(self) -> list[str]:
        """Half-written artifacts, swapped-out old ones and partial files anywhere in the sandbox."""
        found = []
        for folder in (self.work, self.outside, self.home):
            for name in snapshot(folder):
                base = Path(name).name
                if any(fnmatch.fnmatch(base, pattern) for pattern in LEFTOVER_PATTERNS):
                    found.append(str(folder.name + "/" + name))
        now = snapshot(self.tmp)
        new = set(now) - set(self.before.get("tmp", {}))
        logs = {name for name in new if now[name].kind == "file" and name.endswith(LOG_SUFFIX)}
        for name in sorted(new - logs):
            holds_logs = now[name].kind == "dir" and any(log.startswith(name + "/") for log in logs)
            if not holds_logs:
                found.append(f"tmp/{name}")
        return sorted(found)

    def canary_leaks(self, result: Result | None = None) -> list[str]:
        """Places the canary's bytes turned up in: it was read."""
        needle = CANARY_BYTES[:32]
        leaks = []
        for folder in (self.work, self.home, self.cache, self.tmp):
            for dirpath, _, filenames in os.walk(folder):
                for name in filenames:
                    path = Path(dirpath) / name
                    if path.is_symlink() or not path.is_file() or path.stat().st_size > BIG_FILE:
                        continue
                    try:
                        data = path.read_bytes()
                    except OSError:
                        continue
                    if needle in data or _npz_holds(data, needle):
                        leaks.append(str(path.relative_to(self.root)))
        if result is not None and (str(CANARY[0]) in result.stderr + result.stdout):
            leaks.append("the command's output")
        return leaks

    def changes(self, name: str, allowed_new: Iterable[str] = (), allowed_changed: Iterable[str] = ()) -> list[str]:
        """Pre-existing entries of ``name`` that changed or vanished, and new entries not allowed."""
        before = self.before.get(name, {})
        after = snapshot(getattr(self, name))
        new_ok = list(allowed_new)
        changed_ok = list(allowed_changed)

        def under(path: str, roots: list[str]) -> bool:
            return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

        problems = []
        for path, entry in before.items():
            if under(path, changed_ok):
                continue
            now = after.get(path)
            if now is None:
                problems.append(f"{name}/{path} was deleted")
            elif now.kind != entry.kind or now.digest != entry.digest or (
                    entry.kind == "file" and now.mtime_ns != entry.mtime_ns):
                problems.append(f"{name}/{path} was modified")
        for path in sorted(set(after) - set(before)):
            if not under(path, new_ok + changed_ok):
                problems.append(f"{name}/{path} was created")
        return problems


def _npz_holds(data: bytes, needle: bytes) -> bool:
    """Whether a zip (an .npz written compressed) holds ``needle`` in one of its members."""
    if not data.startswith(b"PK"):
        return False
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(needle in archive.read(info) for info in archive.infolist() if info.file_size < 1 << 26)
    except Exception:
        return False


# --- the checker --------------------------------------------------------------


def has_traceback(text: str) -> bool:
    """Whether ``text`` holds a Python traceback (a line of its own, not an escaped name quoting one)."""
    return re.search(r"^\s*Traceback \(most recent call last\):", text, flags=re.M) is not None


def one_line(result: Result) -> str:
    """The single stderr line of a refusal (asserts there is exactly one, short, without a traceback).

    Progress lines (``[bitpass] ...``, printed without ``-q``) are not part of the error report.
    """
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(PROGRESS)]
    assert not has_traceback(result.stderr), f"a traceback instead of one line:\n{result.describe()}"
    assert len(lines) == 1, f"expected ONE line on stderr, got {len(lines)}:\n{result.describe()}"
    assert len(lines[0]) < MAX_LINE, f"the error line has {len(lines[0])} characters (limit {MAX_LINE}):\n" \
                                     f"{lines[0][:600]}"
    return lines[0]


def refused(box: Sandbox, result: Result, match: str | None = None, *, status: int | Sequence[int] = (1, 2),
            changed: Iterable[str] = ()) -> str:
    """The whole promise for bad input; returns the error line.

    ``match``: a regex (case-insensitive) the line must contain: it names the cause.
    ``status``: the exit status expected (one, or any of several; never 0).
    ``changed``: work/ paths the command was allowed to change (none for a refusal, normally).
    """
    assert not result.timed_out, f"the command hung:\n{result.describe()}"
    allowed = (status,) if isinstance(status, int) else tuple(status)
    assert result.status != 0, f"bad input ended with exit 0:\n{result.describe()}"
    assert result.status in allowed, f"exit {result.status}, expected {allowed}:\n{result.describe()}"
    line = one_line(result)
    if match is not None:
        assert re.search(match, line, flags=re.I), f"the error line does not name the cause ({match!r}):\n{line}"
    untouched(box, result, changed=changed)
    return line


def succeeded(box: Sandbox, result: Result, *, creates: Iterable[str] = (), changed: Iterable[str] = ()) -> None:
    """A good (or hostile but answerable) input: exit 0, and still nothing lost, leaked or left over."""
    assert not result.timed_out, f"the command hung:\n{result.describe()}"
    assert result.status == 0, f"expected success:\n{result.describe()}"
    assert not has_traceback(result.stderr), result.describe()
    untouched(box, result, new=creates, changed=changed)


def untouched(box: Sandbox, result: Result, *, new: Iterable[str] = (), changed: Iterable[str] = ()) -> None:
    """Nothing outside written, nothing of the user's changed, no leftovers, the canary never read."""
    problems = box.changes("work", allowed_new=new, allowed_changed=changed)
    problems += box.changes("outside")
    problems += [p for p in box.changes("home") if not p.startswith("home/.cache/bitpass")]
    problems += [f"left behind: {name}" for name in box.leftovers()]
    problems += [f"the canary outside the working folder was read: its bytes are in {where}"
                 for where in box.canary_leaks(result)]
    assert not problems, "the promise is broken:\n  " + "\n  ".join(problems) + "\n" + result.describe()


# --- building inputs ------------------------------------------------------------

RNG_SEED = 20261130


def tensor_info(name: str, shape: Sequence[int | str] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[TensorProto] = (), *,
               opset: int = 17, ir_version: int | None = None, name: str = "hostile") -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def weights(shape: Sequence[int], name: str, seed: int = 0, scale: float = 1.0) -> TensorProto:
    rng = np.random.default_rng(RNG_SEED + seed)
    return numpy_helper.from_array((rng.standard_normal(tuple(shape)) * scale).astype(np.float32), name)


def mlp(batch: int | str = "N", features: int = 8, classes: int = 4) -> onnx.ModelProto:
    """x[batch, 8] -> MatMul -> Add -> Relu -> MatMul -> y[batch, 4]: a tiny classifier every pipeline handles."""
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")],
        [tensor_info("x", [batch, features])], [tensor_info("y", [batch, classes])],
        [weights([features, 16], "w1", 1), weights([16], "b1", 2, 0.1), weights([16, classes], "w2", 3)])


def samples(count: int = 32, features: int = 8, seed: int = 0, labels: int | None = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED + 100 + seed)
    arrays = {"x": rng.standard_normal((count, features)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, labels, count)
    return arrays


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def user_files(box: Sandbox, *, calib: bool = True, evaluation: bool = True) -> dict[str, Path]:
    """The tiny classifier as work/model.onnx with work/calib.npz and work/eval.npz (held-out, labelled)."""
    files = {"model": save_model(mlp(), box.work / "model.onnx")}
    if calib:
        files["calib"] = save_npz(box.work / "calib.npz", **samples(32, seed=1, labels=None))
    if evaluation:
        files["eval"] = save_npz(box.work / "eval.npz", **samples(24, seed=2))
    return files


def external_tensor(name: str, shape: Sequence[int], location: str, offset: int | None = None,
                    length: int | None = None) -> TensorProto:
    """A float tensor whose bytes live in an external file at ``location`` (as written, not checked)."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    if offset is not None:
        tensor.external_data.add(key="offset", value=str(offset))
    if length is not None:
        tensor.external_data.add(key="length", value=str(length))
    return tensor


def add_weight_model(weight: TensorProto, size: int = 64) -> onnx.ModelProto:
    """y = x + w with w[size]: the weight's bytes flow to the output unchanged (so a read canary shows)."""
    return make_model([helper.make_node("Add", ["x", weight.name], ["y"])], [tensor_info("x", ["N", size])],
                      [tensor_info("y", ["N", size])], [weight])


def artifact(box: Sandbox, name: str = "art", *, pipeline: str = "optimize") -> Path:
    """A genuine artifact compiled by bitpass from the tiny classifier (checked to succeed)."""
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", name, "--pipeline", pipeline, "--calib", files["calib"],
                     "--eval", files["eval"], "--no-latency", "-q")
    assert result.status == 0, result.describe()
    return box.work / name


def process_state(pid: int) -> str:
    """The one-letter state of a process (``T`` when stopped), or ``""`` once it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text.rsplit(")", 1)[1].split()[0]


def wait_until_stopped(process: Process, timeout: float = 90) -> bool:
    """Wait for ``process`` to stop itself at the pause hook; False if it exited (or never stopped) instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.exited():
            return False
        if process_state(process.pid) == "T":
            return True
        time.sleep(0.02)
    return False


@dataclass
class Paused:
    """A bitpass process started with the pause hook, stopped just before it publishes."""

    process: Process

    def resume(self, sig: int | None = None) -> None:
        if sig is not None:
            self.process.signal(sig)
        self.process.signal(signal.SIGCONT)

    def finish(self, timeout: float = 120) -> Result:
        return self.process.finish(timeout)


def start_paused(box: Sandbox, *argv: str | os.PathLike[str], fresh: bool = False) -> Paused:
    """Start ``bitpass ARGV`` with the pause hook and wait until it stops before publishing."""
    process = box.spawn(*argv, env={PAUSE_HOOK: "1"}, fresh=fresh)
    if not wait_until_stopped(process):
        result = process.finish()
        raise AssertionError(f"bitpass never stopped at the test-only pause hook ({PAUSE_HOOK}=1: SIGSTOP itself "
                             f"right before the destination re-check and rename, read in backends/artifact.py):\n"
                             f"{result.describe()}")
    return Paused(process)


# --- hostile files ----------------------------------------------------------------


def deflate_bomb(path: Path, member: str = "x.npy", shape: tuple[int, ...] = (1 << 28,)) -> Path:
    """A real .npz whose one member (float32 zeros of ``shape``, 1 GiB by default) deflates to about a
    megabyte, built without compressing a gigabyte: a deflate block encoding 64 MiB of zeros only refers
    back to zeros, so after the first block the same bytes repeat (the zip's CRC is computed honestly)."""
    import struct
    import zlib

    header = io_header(shape, "<f4")
    total = int(np.prod(shape)) * 4
    block = 64 << 20
    assert total % block == 0, "the bomb is built in 64 MiB blocks"
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(header + bytes(block)) + packer.flush(zlib.Z_SYNC_FLUSH)
    repeat = packer.compress(bytes(block)) + packer.flush(zlib.Z_SYNC_FLUSH)
    data = first + repeat * (total // block - 1) + packer.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    zeros = bytes(block)
    for _ in range(total // block):
        crc = zlib.crc32(zeros, crc)
    size = len(header) + total
    name = member.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), size, len(name),
                          0, 0, 0, 0, 0o644 << 16, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)
    return path


def io_header(shape: tuple[int, ...], descr: str, fortran: bool = False) -> bytes:
    """A version-1.0 .npy header for ``shape`` and ``descr``."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)})
    return buffer.getvalue()


def npz_with_members(path: Path, members: Mapping[str, bytes], *, compress: bool = False) -> Path:
    """An .npz (a zip) holding exactly ``members`` (raw bytes, .npy or not)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def pickle_payload(marker: Path) -> bytes:
    """Pickle bytes that create ``marker`` when unpickled: unpickling shows as the file appearing."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Payload())
