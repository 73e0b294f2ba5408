"""Property-based: mutated models, pipeline specs and .npz files keep the whole promise.

Whatever hypothesis makes of a valid input, bitpass either succeeds (and still leaks, loses and leaves
nothing) or refuses in one line with exit 1 or 2. Each example runs the real CLI as its own process
(through the fork server) in a fresh sandbox. Bounded for CI: a fixed number of examples per property,
derandomized (the same examples every run), no example database written.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hostile_kit import (
    Sandbox,
    mlp,
    refused,
    samples,
    save_model,
    save_npz,
    succeeded,
    user_files,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

BOUNDED = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_counter = itertools.count()


@pytest.fixture
def sandboxes(tmp_path, zygote):
    """A new sandbox per hypothesis example (function-scoped fixtures are shared across examples)."""
    return lambda: Sandbox(tmp_path / f"example-{next(_counter)}", zygote)


def promise(box: Sandbox, result, creates=("out",)) -> None:
    """Either a success that keeps everything else intact, or a one-line refusal."""
    if result.status == 0:
        succeeded(box, result, creates=creates)
    else:
        refused(box, result, status=(1, 2))


# --- mutated model bytes ----------------------------------------------------------------------------

VALID_MODEL = mlp().SerializeToString()


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
    return bytes(data)


@BOUNDED
@given(data=mutated_bytes(VALID_MODEL))
def test_mutated_model_bytes_keep_the_promise(sandboxes, data):
    box = sandboxes()
    (box.work / "model.onnx").write_bytes(data)
    promise(box, box.run("compile", "model.onnx", "-o", "out", "--pipeline", "optimize", "--no-latency", "-q"))


# --- mutated model fields (through the proto API) -----------------------------------------------------

OPS = ["Relu", "Add", "MatMul", "Gemm", "Conv", "Identity", "Reshape", "Softmax", "Loop", "If", "Rleu", ""]
DTYPES = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT64,
          TensorProto.STRING, TensorProto.BOOL, 0, 99]


@st.composite
def mutated_model(draw) -> onnx.ModelProto:
    model = mlp()
    graph = model.graph
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(["opset", "ir", "op", "attr", "dims", "dtype", "input-shape", "drop-node",
                                      "rename-edge", "extra-output", "domain", "raw-data"]))
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))] if graph.node else None
        if field == "opset":
            model.opset_import[0].version = draw(st.integers(0, 30))
        elif field == "ir":
            model.ir_version = draw(st.integers(0, 15))
        elif field == "op" and node is not None:
            node.op_type = draw(st.sampled_from(OPS))
        elif field == "attr" and node is not None:
            node.attribute.append(helper.make_attribute(draw(st.sampled_from(["axis", "perm", "alpha", "to"])),
                                                        draw(st.one_of(st.integers(-5, 5), st.floats(-2, 2)))))
        elif field == "dims" and graph.initializer:
            tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            if tensor.dims:
                tensor.dims[draw(st.integers(0, len(tensor.dims) - 1))] = draw(st.integers(-2, 64))
        elif field == "dtype" and graph.initializer:
            graph.initializer[0].data_type = draw(st.sampled_from(DTYPES))
        elif field == "input-shape":
            dims = graph.input[0].type.tensor_type.shape.dim
            dim = dims[draw(st.integers(0, len(dims) - 1))]
            choice = draw(st.one_of(st.integers(-3, 1 << 40), st.text(max_size=5)))
            if isinstance(choice, int):
                dim.dim_value = choice
            else:
                dim.dim_param = choice
        elif field == "drop-node" and node is not None:
            graph.node.remove(node)
        elif field == "rename-edge" and node is not None and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(["x", "y", "w1", "nowhere"]))
        elif field == "extra-output":
            graph.output.append(helper.make_tensor_value_info(draw(st.sampled_from(["h", "x", "w1", "ghost"])),
                                                              TensorProto.FLOAT, None))
        elif field == "domain" and node is not None:
            node.domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "evil.example"]))
        elif field == "raw-data" and graph.initializer:
            tensor = graph.initializer[0]
            tensor.raw_data = tensor.raw_data[: draw(st.integers(0, len(tensor.raw_data)))]
    return model


@BOUNDED
@given(model=mutated_model())
def test_mutated_models_keep_the_promise(sandboxes, model):
    box = sandboxes()
    files = user_files(box, evaluation=False)
    (box.work / "model.onnx").write_bytes(model.SerializeToString())
    promise(box, box.run("compile", "model.onnx", "-o", "out", "--calib", files["calib"], "--no-latency", "-q"))


# --- pipeline specs (strings) -------------------------------------------------------------------------

NAMES = ["fold-constants", "eliminate-dead-nodes", "fuse", "calibrate", "quantize", "set-bits", "fuse-activations",
         "optimize", "default", "fold-constnats", "Fuse", "", "-", "a" * 300]
OPTIONS = ["method", "max_samples", "percentile", "max_added_bytes", "weight", "layers", "batchnorm", "x", "_", "1a"]
VALUES = st.one_of(st.sampled_from(["minmax", "entropy", "true", "none", "[1,2]", "[", "]", "'a,b'", '"', "()",
                                    "1e309", "-1", "0", "99.99", "nan", "[[[]]]", "=", ""]),
                   st.integers(-10, 10 ** 12).map(str), st.text(max_size=8))


@st.composite
def pipeline_spec(draw) -> str:
    items = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(NAMES))
        options = [f"{draw(st.sampled_from(OPTIONS))}={draw(VALUES)}" for _ in range(draw(st.integers(0, 2)))]
        items.append(f"{name}({','.join(options)})" if options else name)
    spec = draw(st.sampled_from([",", ", ", ",,", ";"])).join(items)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(spec)))
        spec = spec[:at] + draw(st.text(alphabet="()[],='\"\\ \n\t\x00é", max_size=3)) + spec[at:]
    return spec.replace("\x00", "")


@BOUNDED
@given(spec=pipeline_spec())
def test_pipeline_specs_keep_the_promise(sandboxes, spec):
    box = sandboxes()
    files = user_files(box, evaluation=False)
    promise(box, box.run("compile", files["model"], "-o", "out", "--pipeline", spec, "--calib", files["calib"],
                         "--no-latency", "-q"))


YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10 ** 6), st.floats(allow_nan=True), st.sampled_from(NAMES),
              st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children,
                                                                                 max_size=3)),
    max_leaves=12)


@BOUNDED
@given(document=st.one_of(YAML_VALUES, st.fixed_dictionaries({"passes": YAML_VALUES})),
       suffix=st.sampled_from([".yaml", ".toml"]))
def test_pipeline_files_keep_the_promise(sandboxes, document, suffix):
    import json

    import yaml

    box = sandboxes()
    files = user_files(box, evaluation=False)
    text = yaml.safe_dump(document) if suffix == ".yaml" else _toml(document)
    (box.work / f"pipeline{suffix}").write_text(text if text is not None else json.dumps(document))
    promise(box, box.run("compile", files["model"], "-o", "out", "--pipeline", f"pipeline{suffix}",
                         "--calib", files["calib"], "--no-latency", "-q"))


def _toml(document) -> str | None:
    """A rough TOML rendering (valid or not: both are inputs worth trying)."""
    if not isinstance(document, dict):
        return None
    lines = []
    for key, value in document.items():
        if isinstance(value, list):
            for item in value:
                lines.append(f"[[{key}]]")
                if isinstance(item, dict):
                    lines.extend(f"{k!r} = {v!r}" for k, v in item.items())
                else:
                    lines.append(f"name = {item!r}")
        else:
            lines.append(f"{key!r} = {value!r}")
    return "\n".join(lines) + "\n"


# --- .npz files ---------------------------------------------------------------------------------------

def _valid_npz() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **samples(16, seed=4, labels=None))
    return buffer.getvalue()


VALID_NPZ = _valid_npz()


@BOUNDED
@given(data=mutated_bytes(VALID_NPZ))
def test_mutated_npz_bytes_keep_the_promise(sandboxes, data):
    box = sandboxes()
    save_model(mlp(), box.work / "model.onnx")
    (box.work / "calib.npz").write_bytes(data)
    promise(box, box.run("compile", "model.onnx", "-o", "out", "--calib", "calib.npz", "--no-latency", "-q"))


ARRAYS = hnp.arrays(
    dtype=st.one_of(hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.boolean_dtypes(), hnp.unicode_string_dtypes(),
                    hnp.complex_number_dtypes(), hnp.datetime64_dtypes()),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))


@BOUNDED
@given(arrays=st.dictionaries(st.sampled_from(["x", "labels", "bitpass_labels", "y", "x "]), ARRAYS, max_size=3))
def test_arbitrary_npz_contents_keep_the_promise(sandboxes, arrays):
    box = sandboxes()
    save_model(mlp(), box.work / "model.onnx")
    save_npz(box.work / "calib.npz", **samples(16, labels=None))
    save_npz(box.work / "eval.npz", **arrays)
    promise(box, box.run("compile", "model.onnx", "-o", "out", "--calib", "calib.npz", "--eval", "eval.npz",
                         "--no-latency", "-q"))
