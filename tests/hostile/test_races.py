"""Races and signals around publishing: real ``bitpass`` processes, stopped at the moment before they publish.

The test-only hook ``BITPASS_TEST_PAUSE_BEFORE_PUBLISH`` (read in one place, backends/artifact.py) makes
bitpass stop itself with SIGSTOP once the staged artifact is complete, right before the destination is
re-checked and the rename happens. While it is stopped, a case creates a folder at ``-o``, runs a
second compile to the same ``-o``, or sends a signal; then it lets the first one continue.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from hostile_kit import Sandbox, has_traceback, refused, start_paused, succeeded, untouched, user_files


def _argv(files, output="out", *extra):
    return ["compile", files["model"], "-o", output, "--calib", files["calib"], "--no-latency", "-q", *extra]


def _is_artifact(folder) -> bool:
    manifest = folder / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("schema") is not None \
        and (folder / "model.onnx").is_file()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_folder_created_at_the_output_mid_compile_is_never_replaced(box: Sandbox, force):
    files = user_files(box)
    box.take_snapshot()
    paused = start_paused(box, *_argv(files, "out", *(["--force"] if force else [])))
    user = box.work / "out"
    user.mkdir()
    (user / "thesis.tex").write_text("\\chapter{Results}\n")
    (user / "manifest.json").write_text(json.dumps({"name": "not bitpass"}))
    paused.resume()
    result = paused.finish()
    refused(box, result, "out", status=(1, 2), changed=["out"])
    assert (user / "thesis.tex").read_text() == "\\chapter{Results}\n"
    assert sorted(p.name for p in user.iterdir()) == ["manifest.json", "thesis.tex"]


def test_a_file_created_at_the_output_mid_compile_is_never_replaced(box: Sandbox):
    files = user_files(box)
    box.take_snapshot()
    paused = start_paused(box, *_argv(files))
    (box.work / "out").write_text("my results\n")
    paused.resume()
    result = paused.finish()
    refused(box, result, "out", status=(1, 2), changed=["out"])
    assert (box.work / "out").read_text() == "my results\n"


def _race(box: Sandbox, files, *extra: str, fresh: bool = False):
    """The first compile stops before publishing; the second runs meanwhile (it may also wait for, or
    refuse, the first one's lock); then the first continues. Both results, first then second."""
    first = start_paused(box, *_argv(files, "out", *extra), fresh=fresh)
    second = box.spawn(*_argv(files, "out", "--seed", "1", *extra), fresh=fresh)
    for _ in range(400):  # up to 20 s for the second to finish (or to block on a lock)
        if second.exited():
            break
        time.sleep(0.05)
    first.resume()
    return first.finish(), second.finish()


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "console-script"])
def test_two_compiles_to_one_output_never_silently_replace_each_other(box: Sandbox, fresh):
    """Exactly one may succeed; the other fails with one line; the survivor is a whole artifact."""
    files = user_files(box)
    box.take_snapshot()
    results = _race(box, files, fresh=fresh)
    winners = [r for r in results if r.status == 0]
    losers = [r for r in results if r.status != 0]
    assert len(winners) == 1, "two compiles to one -o: " + " / ".join(r.describe() for r in results)
    refused(box, losers[0], "out", status=(1, 2), changed=["out"])
    assert _is_artifact(box.work / "out")
    untouched(box, winners[0], new=["out"])
    check = box.run("verify", "out")
    succeeded(box, check, changed=["out"])


def test_two_forced_compiles_to_one_output_leave_one_whole_artifact(box: Sandbox):
    files = user_files(box)
    box.take_snapshot()
    results = _race(box, files, "--force")
    for result in results:
        if result.status != 0:
            refused(box, result, status=(1, 2), changed=["out"])
    assert any(r.status == 0 for r in results), " / ".join(r.describe() for r in results)
    assert _is_artifact(box.work / "out")
    assert box.leftovers() == []


@pytest.mark.parametrize("sig, fresh", [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGINT, False),
                                        (signal.SIGTERM, True)], ids=["TERM", "HUP", "INT", "TERM-console-script"])
def test_a_signal_just_before_publishing_leaves_nothing(box: Sandbox, sig, fresh):
    files = user_files(box)
    box.take_snapshot()
    paused = start_paused(box, *_argv(files), fresh=fresh)
    paused.resume(sig)
    result = paused.finish()
    assert result.status != 0, result.describe()
    assert not has_traceback(result.stderr), result.describe()
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 1, result.describe()
    assert not (box.work / "out").exists()
    untouched(box, result)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_replacing_an_artifact_keeps_the_old_one(box: Sandbox, sig):
    files = user_files(box)
    first = box.run(*_argv(files))
    assert first.status == 0, first.describe()
    box.take_snapshot()
    paused = start_paused(box, *_argv(files, "out", "--force", "--seed", "3"))
    paused.resume(sig)
    result = paused.finish()
    assert result.status != 0, result.describe()
    assert not has_traceback(result.stderr), result.describe()
    untouched(box, result)
    assert _is_artifact(box.work / "out")
