"""The sample third-party plugin, installed for real and used from a fresh process.

``plugins/bitpass-sample-plugin`` is its own distribution. It is pip-installed
(offline: no index, no dependencies, no build isolation) into a temporary
folder, and a subprocess with that folder on ``PYTHONPATH`` must find its pass
and pipeline through entry points alone and run them on a real model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.frontend import annotation, from_onnx

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCE = ROOT / "plugins" / "bitpass-sample-plugin"
CLI = Path(sys.executable).with_name("bitpass")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin installed with pip into a folder of its own; the venv is left untouched."""
    work = tmp_path_factory.mktemp("sample_plugin")
    source = work / "src"
    # build from a copy, so that setuptools' build/ and *.egg-info never land in the repository
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def tiny_onnx(path: Path) -> dict[str, np.ndarray]:
    """A two-layer model (Gemm, then MatMul) saved to ``path``; returns its weights by layer id."""
    rng = np.random.default_rng(0)
    weights = {"fc1": rng.standard_normal((6, 4)).astype(np.float32),
               "fc2": (rng.standard_normal((6, 3)) * 3).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2")]
    initializers = [numpy_helper.from_array(weights["fc1"], "fc1.weight"),
                    numpy_helper.from_array(np.zeros(6, np.float32), "fc1.bias"),
                    numpy_helper.from_array(weights["fc2"], "fc2.weight")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return weights


PROBE = """
import json
from bitpass.frontend import from_onnx
from bitpass.frontend.errors import UsageError
from bitpass.passes.infra import PassContext
from bitpass.plugins import Registry

registry = Registry.discover()
report = {
    "passes": {e.name: [e.package, e.obj.summary(), e.obj.options()] for e in registry.pass_entries()},
    "pipelines": {e.name: [e.package, e.obj] for e in registry.pipeline_entries()},
    "broken": [b.describe() for b in registry.broken if b.package != "bitpass"],
    "records": {},
}
for spec, out in [("weight-stats", "named.onnx"), ("annotate-weight-stats(min_params=20,digits=3)", "text.onnx")]:
    ctx = PassContext()
    registry.pipeline(spec).run(from_onnx("tiny.onnx"), ctx).save(out)
    report["records"][spec] = ctx.records["annotate-weight-stats"]
try:
    registry.pipeline("annotate-weight-stats(digits=0)")
except UsageError as err:
    report["usage_error"] = str(err)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def probe(plugin_site, tmp_path_factory) -> tuple[dict, Path, dict[str, np.ndarray]]:
    """One fresh process with the install folder on PYTHONPATH: what it discovered, and the models it wrote."""
    work = tmp_path_factory.mktemp("probe")
    weights = tiny_onnx(work / "tiny.onnx")
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=work,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), work, weights


def test_the_installed_plugin_is_discovered_by_entry_point_with_its_package_name(probe):
    report, _, _ = probe
    package, summary, options = report["passes"]["annotate-weight-stats"]
    assert package == "bitpass-sample-plugin"
    assert summary.startswith("Annotate each layer with its weight's absolute maximum and RMS")
    assert set(options) == {"min_params", "digits"}
    assert report["pipelines"]["weight-stats"] == ["bitpass-sample-plugin",
                                                   "fold-constants,eliminate-dead-nodes,annotate-weight-stats"]
    assert report["broken"] == []


def test_the_plugin_is_installed_only_in_its_folder():
    # this process does not have the install folder on sys.path: the venv was not touched
    from bitpass.plugins import Registry

    assert "annotate-weight-stats" not in {e.name for e in Registry.discover().pass_entries()}


def test_a_pipeline_with_the_plugin_pass_annotates_a_real_model(probe):
    report, work, weights = probe
    assert report["records"] == {"weight-stats": {"layers_annotated": 2},
                                 "annotate-weight-stats(min_params=20,digits=3)": {"layers_annotated": 1}}

    # the annotations were saved with the model: read them back in this process
    named = {layer.id: layer.node for layer in from_onnx(work / "named.onnx").layers()}
    assert set(named) == {"fc1", "fc2"}
    for layer_id, weight in weights.items():
        absmax = annotation.get(named[layer_id], "plugin.weight_absmax")
        rms = annotation.get(named[layer_id], "plugin.weight_rms")
        assert absmax == pytest.approx(float(np.abs(weight).max()), abs=1e-6)
        assert rms == pytest.approx(float(np.sqrt(np.mean(weight.astype(np.float64) ** 2))), abs=1e-6)
    assert annotation.get(named["fc2"], "plugin.weight_absmax") > annotation.get(named["fc1"], "plugin.weight_absmax")

    text = {layer.id: layer.node for layer in from_onnx(work / "text.onnx").layers()}
    assert annotation.get(text["fc1"], "plugin.weight_absmax") == round(float(np.abs(weights["fc1"]).max()), 3)
    assert annotation.get(text["fc2"], "plugin.weight_absmax") is None  # 18 weights < min_params=20


def test_plugin_options_are_validated_like_built_in_ones(probe):
    report, _, _ = probe
    assert report["usage_error"].startswith("pass 'annotate-weight-stats': digits=0")


@pytest.mark.skipif(not CLI.is_file() or not (ROOT / "tools" / "cli.py").is_file(),
                    reason="the bitpass command is not written yet")
def test_bitpass_passes_lists_the_plugin_with_its_package(plugin_site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(plugin_site), "COLUMNS": "240"}  # no table wrapping mid-name
    done = subprocess.run([str(CLI), "passes"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if "annotate-weight-stats" in line)
    assert "bitpass-sample-plugin" in line
