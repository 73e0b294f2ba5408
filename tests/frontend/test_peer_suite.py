"""The peer suite: ONNX's own backend test models, compiled with ``--pipeline optimize``, against their reference outputs.

The models are those the onnx wheel ships under ``onnx/backend/test/data`` (onnx 1.23 ships no
``node/`` folder): ``pytorch-converted`` (82), ``pytorch-operator`` (35), ``simple`` (23), each with
``test_data_set_0/{input,output}_*.pb``, and ``light`` (9 real architectures with stand-in weights,
whose inputs the onnx runner generates as ``arange(n) / n``). Of those 149, the chosen set is the
140 that bitpass, a compiler of floating-point inference models, should handle:

* every model whose inputs and outputs are numeric tensors with at least one floating-point one,
* except the 6 ``StringNormalizer`` models (text), the 2 ``Gradient`` models (training graphs,
  ``ai.onnx.preview.training``) and ``test_operator_non_float_params`` (integers only).

Most are opset 6 to 12, so the importer's opset upgrade is exercised on every one. Each is compiled
through the Python API (in process: 140 CLI processes would take minutes), its artifact loaded by
the ONNX Runtime backend (session.json applied) and fed the reference inputs as they are (many are
not batches: ``mm`` takes a 2x3 and a 3x4 matrix), and compared output by output with the reference
(rtol 1e-3 as the onnx runner, atol 1e-5 for fp32 reassociation, NaN equal to NaN). At least 135
must pass; failures are listed with their cause.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bitpass.plugins import default_registry
from bitpass.tools.api import compile as compile_model

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
KINDS = ("pytorch-converted", "pytorch-operator", "simple")
EXCLUDED = {
    "simple/test_gradient_of_add": "training graph (Gradient)",
    "simple/test_gradient_of_add_and_mul": "training graph (Gradient)",
    "pytorch-operator/test_operator_non_float_params": "integers only",
}
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
STRING = onnx.TensorProto.STRING
CHOSEN, REQUIRED = 140, 135


def _load_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _elem_types(model: onnx.ModelProto) -> list[int]:
    values = [*_graph_inputs(model), *model.graph.output]
    return [v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else -1 for v in values]


def _light_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The inputs the onnx runner feeds a light model: arange(n) / n in the declared shape (unknown dims 1)."""
    feeds = {}
    for value in _graph_inputs(model):
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim)
        count = int(np.prod(shape))
        feeds[value.name] = (np.arange(count).reshape(shape) / count).astype(np.float32)
    return feeds


def peer_models() -> list[tuple[str, Path, dict[str, np.ndarray] | None, list[np.ndarray]]]:
    """(name, model path, inputs or None to read them later, reference outputs) of every candidate, sorted."""
    found = []
    for kind in KINDS:
        for case in sorted((DATA / kind).iterdir()):
            data = case / "test_data_set_0"
            if (case / "model.onnx").is_file() and data.is_dir():
                found.append((f"{kind}/{case.name}", case / "model.onnx", None,
                              [_load_tensor(p) for p in sorted(data.glob("output_*.pb"))]))
    for model in sorted((DATA / "light").glob("*.onnx")):
        found.append((f"light/{model.stem}", model, None, [_load_tensor(model.with_name(f"{model.stem}_output_0.pb"))]))
    return found


def chosen_models():
    """The 140 models of the module docstring, with their inputs."""
    chosen = []
    for name, path, _, expected in peer_models():
        model = onnx.load(path, load_external_data=False)
        types = _elem_types(model)
        if name in EXCLUDED or STRING in types or -1 in types or not FLOATS & set(types):
            continue
        if name.startswith("light/"):
            feeds = _light_inputs(model)
        else:
            files = sorted((path.parent / "test_data_set_0").glob("input_*.pb"))
            feeds = {value.name: _load_tensor(file) for value, file in zip(_graph_inputs(model), files)}
        chosen.append((name, path, feeds, expected, [o.name for o in model.graph.output]))
    return chosen


def _check(name, path, feeds, expected, output_names, out: Path) -> str | None:
    """None when the compiled model reproduces the reference outputs, else why not (one line)."""
    try:
        artifact = compile_model(str(path), out, pipeline="optimize", latency=False)
        runner = default_registry().backend(artifact.manifest["backend"])().load(out, artifact.manifest)
        got = dict(zip(runner.output_names, runner.run(feeds)))
    except Exception as err:  # a failing model is a finding to list, not a crash of the suite
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {text[:200]}"
    for output, want in zip(output_names, expected):
        if output not in got:
            return f"output {output!r} missing (got {sorted(got)})"
        have = got[output]
        if have.shape != want.shape:
            return f"output {output!r} has shape {have.shape}, the reference {want.shape}"
        if not np.allclose(have.astype(np.float64), want.astype(np.float64), rtol=1e-3, atol=1e-5, equal_nan=True):
            error = float(np.nanmax(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            return f"output {output!r} differs from the reference (max abs error {error:.3g})"
    return None


def test_the_chosen_set_is_the_documented_140():
    names = [entry[0] for entry in chosen_models()]
    assert len(names) == CHOSEN, len(names)
    assert len(set(names)) == CHOSEN
    assert sum(n.startswith("light/") for n in names) == 9


def test_at_least_135_of_the_140_peer_models_compile_to_their_reference_outputs(tmp_path):
    failures = {}
    models = chosen_models()
    for index, (name, path, feeds, expected, output_names) in enumerate(models):
        problem = _check(name, path, feeds, expected, output_names, tmp_path / f"artifact-{index}")
        if problem:
            failures[name] = problem
    passed = len(models) - len(failures)
    listing = "\n".join(f"  {name}: {why}" for name, why in sorted(failures.items()))
    assert passed >= REQUIRED, f"{passed}/{len(models)} peer models pass (need {REQUIRED}); failures:\n{listing}"
