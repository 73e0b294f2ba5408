"""Artifact folders: published whole or not at all, never replacing or deleting what bitpass did not write,
and verifiable file by file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitpass.backends import artifact as artifact_io
from bitpass.backends.artifact import Destination, staging
from bitpass.frontend.errors import BitpassError, UsageError


def write_artifact(stage: Path, payload: bytes = b"model bytes") -> dict:
    """A minimal artifact as a backend + compile would write it."""
    (stage / "model.onnx").write_bytes(payload)
    manifest = {"schema": artifact_io.MANIFEST_SCHEMA, "backend": "onnxruntime", "target": "cpu", "layers": [],
                "inputs": [], "outputs": [], "files": artifact_io.file_table(stage, ["model.onnx"])}
    artifact_io.write_manifest(stage, manifest)
    return manifest


def published(out: Path, payload: bytes = b"model bytes", force: bool = False) -> Path:
    with staging(out, force=force) as stage:
        write_artifact(stage, payload)
    return out


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_a_published_artifact_leaves_no_stage_or_work_folder(tmp_path):
    out = published(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "manifest.sha256", "model.onnx"]
    assert leftovers(tmp_path, {"out"}) == []
    assert artifact_io.is_own_artifact(out)


def test_a_failed_compile_leaves_nothing_not_even_the_parents_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), staging(out) as stage:
        (stage / "model.onnx").write_bytes(b"half")
        raise RuntimeError("a pass failed")
    assert leftovers(tmp_path, set()) == []


def test_missing_parent_folders_are_created(tmp_path):
    out = published(tmp_path / "new" / "sub" / "out")
    assert artifact_io.is_own_artifact(out)


def test_a_folder_that_appears_mid_compile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BitpassError, match="appeared while bitpass was compiling"), staging(out) as stage:
        write_artifact(stage)
        out.mkdir()  # the user (or another tool) creates it while bitpass measures the stage
        (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert leftovers(tmp_path, {"out"}) == []


def test_an_empty_folder_that_appears_mid_compile_is_not_replaced_either(tmp_path):
    """os.rename would silently replace an empty directory; publishing must not."""
    out = tmp_path / "out"
    with pytest.raises(BitpassError, match="appeared"), staging(out) as stage:
        write_artifact(stage)
        out.mkdir()
    assert out.is_dir() and list(out.iterdir()) == []


def test_even_force_does_not_replace_a_folder_that_appears_mid_compile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BitpassError), staging(out, force=True) as stage:
        write_artifact(stage)
        out.mkdir()
        (out / "index.html").write_text("<html>")
        (out / "manifest.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "manifest.json"]


def test_force_refuses_a_folder_that_merely_contains_a_manifest(tmp_path):
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "my web app"}')
    (web / "app.js").write_text("console.log(1)")
    with pytest.raises(UsageError, match="not an artifact bitpass wrote"):
        published(web, force=True)
    assert sorted(p.name for p in web.iterdir()) == ["app.js", "manifest.json"]
    assert leftovers(tmp_path, {"webapp"}) == []


def test_force_refuses_our_artifact_once_someone_added_a_file_to_it(tmp_path):
    out = published(tmp_path / "out")
    (out / "my-notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="my-notes.txt"):
        published(out, b"new", force=True)
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "model.onnx").read_bytes() == b"model bytes"


def test_force_refuses_our_artifact_once_its_manifest_was_edited(tmp_path):
    out = published(tmp_path / "out")
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace("cpu", "gpu"))
    with pytest.raises(UsageError, match="not an artifact bitpass wrote"):
        published(out, b"new", force=True)


def test_force_replaces_an_intact_artifact_of_ours(tmp_path):
    out = published(tmp_path / "out")
    published(out, b"second", force=True)
    assert (out / "model.onnx").read_bytes() == b"second"
    assert leftovers(tmp_path, {"out"}) == []


def test_force_on_a_symlinked_output_is_refused_and_leaves_no_links_behind(tmp_path):
    real = published(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UsageError, match="symbolic link"):
        published(link, b"new", force=True)
    assert link.is_symlink() and (real / "model.onnx").read_bytes() == b"model bytes"
    assert leftovers(tmp_path, {"real", "link"}) == []


def test_an_output_under_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        published(tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "x"


def test_two_writers_one_publishes_the_other_fails_and_nothing_is_replaced(tmp_path):
    out = tmp_path / "out"
    with Destination(out) as first:
        with pytest.raises(BitpassError, match=f"another bitpass \\(pid {os.getpid()}\\) is writing"):
            with Destination(out):
                pass
        stage = first.stage()
        write_artifact(stage, b"first")
        first.publish(stage)
    assert (out / "model.onnx").read_bytes() == b"first"
    with pytest.raises(UsageError, match="already exists"):
        published(out, b"second")
    assert (out / "model.onnx").read_bytes() == b"first"
    assert leftovers(tmp_path, {"out"}) == []


def test_the_work_folder_of_a_killed_compile_is_cleared(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out{artifact_io.WORK_SUFFIX}"
    (stale / "stage-1").mkdir(parents=True)
    (stale / "owner.json").write_text(json.dumps({"pid": 999999}))
    published(out)
    assert leftovers(tmp_path, {"out"}) == []


def test_a_folder_with_the_work_name_that_bitpass_did_not_make_is_left_alone(tmp_path):
    impostor = tmp_path / f".out{artifact_io.WORK_SUFFIX}"
    impostor.mkdir()
    (impostor / "data.txt").write_text("mine")
    with pytest.raises(BitpassError, match="was not made by bitpass"):
        published(tmp_path / "out")
    assert (impostor / "data.txt").read_text() == "mine"


# --- verification from the files themselves -----------------------------------------------------
@pytest.fixture
def sealed(tmp_path) -> Path:
    return published(tmp_path / "out")


def test_an_untouched_artifact_verifies(sealed):
    assert artifact_io.verify_files(sealed, artifact_io.read_manifest(sealed)) == []


@pytest.mark.parametrize("tamper, expected", [
    (lambda d: (d / "model.onnx").write_bytes(b"evil"), "model.onnx changed"),
    (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
    (lambda d: (d / "extra.bin").write_bytes(b"?"), "extra.bin is not part of the artifact"),
    (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"cpu"', '"cpu2"')),
     "manifest.json was edited"),
    (lambda d: (d / "manifest.sha256").unlink(), "manifest.sha256 is missing"),
])
def test_any_edit_addition_or_removal_is_detected(sealed, tamper, expected):
    tamper(sealed)
    problems = artifact_io.verify_files(sealed, artifact_io.read_manifest(sealed))
    assert any(expected in p for p in problems), problems


def test_dropping_a_files_entry_from_the_manifest_does_not_hide_the_file(sealed):
    manifest = artifact_io.read_manifest(sealed)
    manifest["files"] = {}
    artifact_io.write_manifest(sealed, manifest)  # even re-sealed consistently
    problems = artifact_io.verify_files(sealed, artifact_io.read_manifest(sealed))
    assert problems == ["model.onnx is not part of the artifact (not listed in manifest.json)"]


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "sub/../../x", "..", ""])
def test_a_manifest_naming_a_path_outside_the_artifact_is_refused_without_reading_it(sealed, name):
    manifest = json.loads((sealed / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    artifact_io.write_manifest(sealed, manifest)
    with pytest.raises(BitpassError, match="not a plain file name"):
        artifact_io.read_manifest(sealed)


def test_a_symlink_inside_the_artifact_pointing_outside_is_refused(sealed, tmp_path):
    (tmp_path / "secret").write_text("s3cret")
    (sealed / "model.onnx").unlink()
    (sealed / "model.onnx").symlink_to(tmp_path / "secret")
    with pytest.raises(BitpassError, match="outside the artifact"):
        artifact_io.verify_files(sealed, artifact_io.read_manifest(sealed))


# --- signals ------------------------------------------------------------------------------------
SLOW_PLUGIN = '''
import time
from bitpass.passes.infra import Pass, PassResult, PRESERVE_ALL

class Sleepy(Pass):
    """Sleeps, so a test can signal a compile in the middle."""
    name = "sleepy"

    def run(self, model, ctx):
        time.sleep(60)
        return PassResult(model, modified=False, preserved=PRESERVE_ALL)
'''


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_mid_compile_leaves_nothing_behind(tmp_path, digits_files, signame):
    import signal

    plugin = tmp_path / "sleepy.py"
    plugin.write_text(SLOW_PLUGIN)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    env = {**os.environ, "BITPASS_CACHE_DIR": str(tmp_path / "cache")}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "bitpass.tools.cli", "compile",
                                    str(digits_files / "model.onnx"), "-o", str(out), "--plugin", str(plugin),
                                    "--pipeline", "sleepy"], stderr=stderr, text=True, env=env,
                                   # a suite started in the background ignores SIGINT, and children inherit that
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while "[bitpass] running sleepy" not in log.read_text():  # the signal lands inside the sleeping pass
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)
        assert (work / f".out{artifact_io.WORK_SUFFIX}").exists(), "the destination is being made"
        process.send_signal(getattr(signal, signame))
        process.wait(timeout=60)
    err = log.read_text()
    assert process.returncode != 0
    lines = [line for line in err.strip().splitlines() if not line.startswith("[bitpass] ")]  # progress
    assert len(lines) == 1 and "nothing was written" in lines[0], err
    assert leftovers(work, set()) == []
