"""A fork server for the hostile corpus: imports bitpass once, then forks one fresh CLI process per request.

Starting ``bitpass`` costs about 2.5 s of imports (torch, onnxruntime, onnxscript); a hundred cases
would spend minutes importing. This server pays that once. Each request forks a child that is a
separate process like the console script's: its own working folder, environment, stdio files and
resource limits; it runs ``bitpass.tools.cli:main`` exactly as the ``bitpass`` script does
(``sys.exit(main())``, an uncaught exception printing its traceback) and exits with its status.

Protocol: one JSON request per line on stdin (``{"op", "argv", "cwd", "env", "stdout", "stderr",
"timeout", "rlimits"}``, see ``main``); one JSON reply per line on stdout.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from importlib import metadata

import bitpass.plugins.registry as registry
import bitpass.tools.api  # noqa: F401  (what every command imports lazily)
import bitpass.tools.cli as cli

for _group in registry.GROUPS:  # the built-in passes import torch: pay for it here, once
    for _entry in metadata.entry_points(group=_group):
        try:
            _entry.load()
        except Exception:  # a broken plugin is the child's business, reported by the CLI
            pass

# what every child shares is frozen out of the collector: a compile's gc.collect() in a child then walks only what
# that child made (0.6 s less per compile), and the shared pages are not copied by the collector's writes
gc.collect()
gc.freeze()


def _exit_status(code: object) -> int:
    """What the interpreter exits with for ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(request: dict) -> None:
    """Become the bitpass process of one request; never returns."""
    status = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills everything it started
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # re-read TMPDIR
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        for name, soft in request.get("rlimits", {}).items():
            limit = getattr(resource, name)
            resource.setrlimit(limit, (soft, resource.getrlimit(limit)[1]))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["bitpass", *request["argv"]]
        try:
            status = _exit_status(cli.main(request["argv"]))
        except SystemExit as exc:
            status = _exit_status(exc.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            status = 130
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            status = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:
            pass
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _spawn(request: dict) -> int:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _child(request)
    return pid


def _wait(pid: int, timeout: float, start: float) -> dict:
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, wait_status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    return {"status": os.waitstatus_to_exitcode(wait_status), "timed_out": timed_out,
            "seconds": time.monotonic() - start}


def main() -> None:
    """Requests: ``{"op": "run", ...}`` (spawn and wait), ``{"op": "spawn", ...}`` (reply the pid at once),
    ``{"op": "wait", "pid", "timeout"}`` (the status of a spawned child)."""
    print(json.dumps({"ready": True}), flush=True)
    started: dict[int, float] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op", "run")
        if op == "spawn":
            pid = _spawn(request)
            started[pid] = time.monotonic()
            reply: dict = {"pid": pid}
        elif op == "wait":
            reply = _wait(request["pid"], request.get("timeout", 120), started.pop(request["pid"], time.monotonic()))
        else:
            start = time.monotonic()
            reply = _wait(_spawn(request), request.get("timeout", 120), start)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
