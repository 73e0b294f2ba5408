"""Data loss (never acceptable): bitpass replaces only a directory it wrote itself, and nothing else of the user's.

A marker bitpass can recognise decides, not the presence of a ``manifest.json``: web apps, PWAs and
browser extensions have one too. The race cases (a folder appearing at ``-o`` mid-compile, two
compiles to one ``-o``) are in ``test_races.py``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hostile_kit import artifact, refused, snapshot, succeeded, user_files


def _web_app(folder):
    folder.mkdir()
    (folder / "index.html").write_text("<html><body>my app</body></html>\n")
    (folder / "app.js").write_text("console.log('hello')\n")
    (folder / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/", "display": "standalone"}))
    return folder


def _compile(box, output, *extra, force=False):
    files = user_files(box)
    argv = ["compile", files["model"], "-o", output, "--pipeline", "optimize", "--no-latency", "-q", *extra]
    return box.run(*argv, *(["--force"] if force else []))


def test_force_never_deletes_a_folder_whose_manifest_bitpass_did_not_write(box):
    _web_app(box.work / "site")
    result = _compile(box, "site", force=True)
    refused(box, result, "site", status=(1, 2))


def test_force_never_deletes_a_user_folder_holding_a_copied_bitpass_manifest(box):
    """A real bitpass manifest.json copied into a user's folder does not make the folder bitpass's."""
    folder = artifact(box)
    user = box.work / "report-drafts"
    user.mkdir()
    shutil.copy(folder / "manifest.json", user / "manifest.json")
    (user / "draft.md").write_text("# my notes\n")
    result = _compile(box, "report-drafts", force=True)
    refused(box, result, "report-drafts", status=(1, 2))


def test_force_never_deletes_files_the_user_added_to_an_artifact(box):
    folder = artifact(box)
    (folder / "my-notes.txt").write_text("measured on the board: 3.1 ms\n")
    result = _compile(box, "art", force=True)
    if result.status == 0:
        assert (folder / "my-notes.txt").read_text() == "measured on the board: 3.1 ms\n", \
            "--force deleted a file bitpass did not write"
        return
    refused(box, result, "art", status=(1, 2))


@pytest.mark.parametrize("kind", ["empty-folder", "user-folder", "user-file", "symlink-to-user-folder",
                                  "dangling-symlink"])
def test_an_existing_output_without_force_is_refused_untouched(box, kind):
    target = box.work / "out"
    if kind == "empty-folder":
        target.mkdir()
    elif kind == "user-folder":
        _web_app(target)
    elif kind == "user-file":
        target.write_text("my data\n")
    elif kind == "symlink-to-user-folder":
        os.symlink(_web_app(box.work / "site"), target)
    else:
        os.symlink(box.work / "nowhere", target)
    result = _compile(box, "out")
    refused(box, result, "out", status=(1, 2))


@pytest.mark.parametrize("kind", ["user-file", "symlink-to-user-folder", "symlink-to-outside", "empty-folder"])
def test_force_never_replaces_what_bitpass_did_not_write(box, kind):
    target = box.work / "out"
    if kind == "user-file":
        target.write_text("my data\n")
    elif kind == "symlink-to-user-folder":
        os.symlink(_web_app(box.work / "site"), target)
    elif kind == "symlink-to-outside":
        os.symlink(box.outside, target)
    else:
        target.mkdir()
    result = _compile(box, "out", force=True)
    refused(box, result, "out", status=(1, 2))


def test_force_through_a_symlink_to_an_artifact_leaves_no_old_links(box):
    artifact(box)
    os.symlink(box.work / "art", box.work / "current")
    before = snapshot(box.work / "art")
    result = _compile(box, "current", force=True)
    if result.status == 0:
        succeeded(box, result, changed=["art", "current"])
        assert (box.work / "current" / "manifest.json").is_file()
    else:
        refused(box, result, "current", status=(1, 2))
        assert snapshot(box.work / "art") == before


def test_force_replaces_an_earlier_artifact(box):
    """The control: --force does replace what bitpass wrote, leaving nothing behind."""
    folder = artifact(box)
    old = (folder / "manifest.json").read_text()
    result = _compile(box, "art", "--seed", "7", force=True)
    succeeded(box, result, changed=["art"])
    assert (folder / "manifest.json").read_text() != old


@pytest.mark.parametrize("output", [".", "..", "./", "work-link"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_the_working_folder_and_its_parents_are_never_the_output(box, output, force):
    if output == "work-link":
        os.symlink(box.work, box.work / "work-link")
    result = _compile(box, output, force=force)
    refused(box, result, status=(1, 2))


@pytest.mark.parametrize("which", ["model", "calib"])
def test_the_input_files_are_never_the_output(box, which):
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", files[which].name, "--calib", files["calib"], "--force", "-q")
    refused(box, result, files[which].name, status=(1, 2))


def test_the_folder_holding_the_model_is_never_replaced(box):
    (box.work / "proj").mkdir()
    files = user_files(box)
    shutil.move(files["model"], box.work / "proj" / "model.onnx")
    (box.work / "proj" / "manifest.json").write_text("{}")
    result = box.run("compile", "proj/model.onnx", "-o", "proj", "--pipeline", "optimize", "--force", "-q")
    refused(box, result, "proj", status=(1, 2))


@pytest.mark.parametrize("kind", ["folder", "missing-parent"])
def test_run_output_problems_lose_nothing(box, kind):
    folder = artifact(box)
    target = "results" if kind == "folder" else "nowhere/y.npz"
    if kind == "folder":
        _web_app(box.work / "results")
    result = box.run("run", folder.name, "--input", "eval.npz", "-o", target)
    refused(box, result, status=(1, 2))
