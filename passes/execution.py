"""ONNX Runtime sessions for every pass and backend: the one place that builds them and sets their options.

Passes measure models (calibration statistics, layer inputs, output errors of candidate rewrites)
and backends run and time artifacts; both build their sessions here, so the options are the same
everywhere and there is one seam where another executor (a worker process, a Ray actor for large
models) can take over. The module sits right above ``bitpass.frontend``: it imports nothing else
of bitpass.

API (small on purpose):

* ``DEFAULT_SESSION`` / ``session_options(config, threads=, for_timing=)``: the options an
  artifact's ``session.json`` holds, as ``onnxruntime.SessionOptions``.
* ``create_session(model, ...)``: a CPU session from a ``Model``, a ``ModelProto``, serialized
  bytes, or a path (loaded by path, so ONNX Runtime resolves external data beside the file). A
  model over protobuf's 2 GiB is saved with external data into a temporary folder bitpass owns
  (removed once the session is made) and loaded by path: the same call for every size.
* ``predict(model, data)``: one output over a whole ``Dataset``, batch by batch.
* ``intermediates(model, data, names)``: per batch, the values of inner tensors (made extra outputs).
* ``quiet()``: keeps ONNX Runtime's quantization tools from printing and logging warnings.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import BitpassError
from bitpass.frontend.model import Provenance, proto_fits_one

#: Saved beside the model as session.json; ``session_options`` rebuilds them on the device.
DEFAULT_SESSION = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 0,
                   "execution_mode": "ORT_SEQUENTIAL", "disabled_optimizers": []}
#: ORT's session config entry that turns named graph optimizers off (``disabled_optimizers`` in session.json)
DISABLE_OPTIMIZERS = "optimization.disable_specified_optimizers"
#: options for sessions that compute statistics on a model exactly as written (no graph rewrites)
UNOPTIMIZED = {"graph_optimization_level": "ORT_DISABLE_ALL"}
PROVIDERS = ["CPUExecutionProvider"]

#: what ``create_session`` accepts
ModelSource = Union[Model, onnx.ModelProto, bytes, str, os.PathLike]


def session_options(config: Mapping[str, Any] | None = None, *, threads: int | None = None,
                    for_timing: bool = False) -> ort.SessionOptions:
    """Options from a session.json config. ``for_timing`` turns off thread spinning: sessions timed
    alternately in one process otherwise steal each other's cores (measured: 2.2x slower at batch 64)."""
    config = {**DEFAULT_SESSION, **(config or {})}
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, config["graph_optimization_level"])
    options.execution_mode = getattr(ort.ExecutionMode, config["execution_mode"])
    options.intra_op_num_threads = int(threads if threads is not None else config["intra_op_num_threads"])
    options.log_severity_level = 4  # errors surface as exceptions; ORT need not print them too
    if "execution_order" in config:  # PRIORITY_BASED: nodes run close to their producers (see calibrate)
        options.execution_order = getattr(ort.ExecutionOrder, config["execution_order"])
    if config.get("disabled_optimizers"):  # e.g. SkipLayerNormFusion where the format search timed it slower
        options.add_session_config_entry(DISABLE_OPTIMIZERS, ";".join(config["disabled_optimizers"]))  # ORT splits on ";"
    if for_timing:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(model: ModelSource, *, config: Mapping[str, Any] | None = None, threads: int | None = None,
                   for_timing: bool = False, purpose: str = "load the model") -> ort.InferenceSession:
    """A CPU session for ``model``; a path is loaded by path, a model over protobuf's 2 GiB from a file with
    external data in a temporary folder (``Model.fits_one_proto``). Errors: ``BitpassError`` "ONNX Runtime cannot
    <purpose>: <its first line>"."""
    if isinstance(model, onnx.ModelProto) and not proto_fits_one(model):
        model = _wrap(model)
    options = session_options(config, threads=threads, for_timing=for_timing)
    if isinstance(model, Model) and not model.fits_one_proto():
        with tempfile.TemporaryDirectory(prefix="bitpass-session-") as folder:
            path = Path(folder) / "model.onnx"
            model.save_external(path)
            return _session(str(path), options, purpose)
    if isinstance(model, Model):
        source: bytes | str = model.to_bytes()
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        source = str(Path(model))
    else:
        source = bytes(model)
    return _session(source, options, purpose)


def _session(source: bytes | str, options: ort.SessionOptions, purpose: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=PROVIDERS)
    except Exception as err:  # ORT raises its own exception types
        raise BitpassError(f"ONNX Runtime cannot {purpose}: {first_line(err)}") from err


def predict(model: ModelSource | ort.InferenceSession, data: Dataset, *, output: int = 0,
            batch_size: int = 256) -> np.ndarray:
    """Output number ``output`` of ``model`` over all of ``data``, concatenated along the first axis."""
    session = model if isinstance(model, ort.InferenceSession) else create_session(model, purpose="run the model")
    name = session.get_outputs()[output].name
    return np.concatenate([session.run([name], dict(feeds))[0] for feeds in data.batches(batch_size)])


def expose_model(model: Model, names: Iterable[str]) -> Model:
    """A clone of ``model`` (sharing its tensors: no weights copied, any size) whose graph outputs also include the
    inner tensors ``names`` of the main graph."""
    copy = model.clone()
    graph = copy.ir.graph
    present = {v.name for v in [*graph.inputs, *graph.outputs]}
    values = {**{name: v for name, v in graph.initializers.items()},
              **{out.name: out for node in graph for out in node.outputs if out.name}}
    for name in dict.fromkeys(names):
        if name in present:
            continue
        if name not in values:
            raise BitpassError(f"no tensor {name!r} in the model's main graph to measure")
        graph.outputs.append(values[name])
        present.add(name)
    return copy


def intermediates(model: Model | onnx.ModelProto, data: Dataset, names: Sequence[str], *, batch_size: int = 64,
                  config: Mapping[str, Any] | None = None,
                  purpose: str = "run the model to measure its inner tensors") -> Iterator[dict[str, np.ndarray]]:
    """Per batch of ``data``: ``{name: value}`` for each tensor in ``names`` (graph inputs come from the batch)."""
    exposed = expose_model(model if isinstance(model, Model) else _wrap(model), names)
    graph_inputs = {v.name for v in exposed.ir.graph.inputs}
    fetch = [n for n in dict.fromkeys(names) if n not in graph_inputs]
    session = create_session(exposed, config=config, purpose=purpose)
    del exposed
    for feeds in data.batches(batch_size):
        got = dict(zip(fetch, session.run(fetch, dict(feeds)))) if fetch else {}
        got.update({n: feeds[n] for n in names if n in graph_inputs})
        yield got


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's quantization tools print and log warnings (pre-processing advice, opset bumps): keep them off the console."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _wrap(proto: onnx.ModelProto) -> Model:
    """``proto`` as a ``Model`` whose tensors wrap its TensorProtos (no weights copied; the proto is not changed)."""
    return Model(ir.serde.deserialize_model(proto), Provenance("proto", "<ModelProto>", ""))


def first_line(err: BaseException) -> str:
    """The first line of an error's message (ONNX Runtime's run to many), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["DEFAULT_SESSION", "UNOPTIMIZED", "create_session", "expose_model", "first_line", "intermediates", "predict",
           "quiet", "session_options"]
