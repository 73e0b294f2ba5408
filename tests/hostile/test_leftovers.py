"""Leftovers and exit codes: a failure is never exit 0, and never leaves a partial artifact, file or temp folder.

Plugins are the hostile party here: a ``--plugin`` file (or a pass it defines) that raises, exits,
kills its own process or interrupts, at import, construction or run time.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from hostile_kit import artifact, refused, samples, save_npz, user_files

PASS_TEMPLATE = '''
import os, signal, sys
from bitpass.passes.infra import Pass, PassResult

class Hostile(Pass):
    """A pass that misbehaves."""
    name = "hostile"

    def run(self, model, ctx):
        {action}
        return PassResult(model, modified=False)
'''

RUN_ACTIONS = {
    "exit-0": "sys.exit(0)",
    "exit-none": "sys.exit()",
    "exit-message": "sys.exit('done here')",
    "raise-runtime": "raise RuntimeError('boom\\nsecond line\\n' + 'x' * 5000)",
    "raise-keyboard": "raise KeyboardInterrupt",
    "raise-base": "raise BaseException('not an Exception')",
    "raise-memory": "raise MemoryError()",
    "raise-recursion": "raise RecursionError('maximum recursion depth exceeded')",
    "sigterm-self": "os.kill(os.getpid(), signal.SIGTERM)",
    "write-partial-then-raise": "open('half-written.bin', 'wb').write(b'x'); raise ValueError('broke after writing')",
}


def _plugin(box, action: str):
    path = box.work / "hostile_plugin.py"
    path.write_text(PASS_TEMPLATE.format(action=action))
    return path


@pytest.mark.parametrize("case", sorted(RUN_ACTIONS))
def test_a_plugin_pass_misbehaving_at_run_time(box, case):
    files = user_files(box)
    _plugin(box, RUN_ACTIONS[case])
    result = box.run("compile", files["model"], "-o", "out", "--plugin", "hostile_plugin.py",
                     "--pipeline", "fold-constants,hostile", "-q")
    if case == "write-partial-then-raise":  # the plugin's own file is the plugin's business
        refused(box, result, "hostile", status=1, changed=["half-written.bin"])
        return
    if case in ("raise-keyboard", "sigterm-self"):
        refused(box, result, status=(1, 2, 130, 143))
        return
    refused(box, result, "hostile", status=(1, 2))


IMPORT_ACTIONS = {
    "exit-0": "import sys\nsys.exit(0)\n",
    "raise": "raise ImportError('needs tensorflow')\n",
    "syntax-error": "def broken(:\n",
    "missing-import": "import a_module_that_does_not_exist\n",
}


@pytest.mark.parametrize("case", sorted(IMPORT_ACTIONS))
def test_a_plugin_file_failing_at_import_is_reported(box, case):
    files = user_files(box)
    (box.work / "broken_plugin.py").write_text(IMPORT_ACTIONS[case])
    result = box.run("compile", files["model"], "-o", "out", "--plugin", "broken_plugin.py", "--pipeline",
                     "optimize", "-q")
    refused(box, result, "broken_plugin.py", status=(1, 2))


def test_a_plugin_pass_exiting_in_its_constructor(box):
    files = user_files(box)
    path = box.work / "hostile_plugin.py"
    path.write_text(PASS_TEMPLATE.format(action="pass") + textwrap.indent(
        "\ndef __init__(self, **options):\n    sys.exit(0)\n", "    "))
    result = box.run("compile", files["model"], "-o", "out", "--plugin", "hostile_plugin.py",
                     "--pipeline", "hostile", "-q")
    refused(box, result, "hostile", status=(1, 2))


@pytest.mark.parametrize("command", ["passes", "pipelines"])
def test_listing_with_a_broken_plugin_file_is_reported(box, command):
    (box.work / "broken_plugin.py").write_text("import sys\nsys.exit(0)\n")
    result = box.run(command, "--plugin", "broken_plugin.py")
    refused(box, result, "broken_plugin.py", status=(1, 2))


def test_a_plugin_path_that_does_not_exist(box):
    files = user_files(box)
    result = box.run("compile", files["model"], "-o", "out", "--plugin", "nowhere.py", "-q")
    refused(box, result, "nowhere.py", status=2)


def test_run_leaves_no_partial_output_when_writing_fails(box):
    """A full disk while writing the outputs: no ``.partial.npz`` and no half-written output."""
    folder = artifact(box)
    save_npz(box.work / "many.npz", **samples(4096, labels=None))
    result = box.run("run", folder.name, "--input", "many.npz", "-o", "y.npz", rlimits={"RLIMIT_FSIZE": 1 << 14})
    refused(box, result, "space|too large|write|disk", status=1)


def test_a_failure_after_staging_leaves_no_partial_artifact(box):
    """The artifact is staged, then measuring fails (NaN-free data a Reshape cannot take)."""
    from hostile_kit import make_model, save_model, tensor_info
    from onnx import helper, numpy_helper

    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [tensor_info("x", ["N", 4])],
                       [tensor_info("y", ["M", 3])], [numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    save_model(model, box.work / "model.onnx")
    save_npz(box.work / "eval.npz", x=np.ones((1, 4), np.float32))
    result = box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--eval", "eval.npz", "-q")
    refused(box, result, status=1)


def test_usage_errors_exit_2_and_failures_exit_1(box):
    files = user_files(box)
    usage = box.run("compile", files["model"], "-o", "out", "--pipeline", "no-such-pass", "-q")
    refused(box, usage, "no-such-pass", status=2)
    (box.work / "broken.onnx").write_bytes(b"\x08\x07" + b"\xff" * 50)
    failure = box.run("compile", "broken.onnx", "-o", "out", "-q")
    refused(box, failure, "broken.onnx", status=1)
