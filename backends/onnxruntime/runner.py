"""Run an ONNX model with ONNX Runtime's CPU execution provider (sessions built by ``bitpass.passes.execution``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bitpass.backends.base import Runner
from bitpass.frontend.errors import BitpassError
from bitpass.frontend.model import varint
from bitpass.passes.execution import DEFAULT_SESSION, create_session, session_options

__all__ = ["DEFAULT_SESSION", "OrtRunner", "session_options"]


def read_session_config(directory: Path) -> dict[str, Any] | None:
    """``session.json`` of an artifact (None when absent); only known keys with values of the right kind."""
    path = Path(directory) / "session.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_bytes()[:1 << 16])
    except (ValueError, RecursionError) as err:
        raise BitpassError(f"{path}: not valid JSON ({str(err)[:80]})") from err
    if not isinstance(config, dict) or not set(config) <= set(DEFAULT_SESSION) \
            or not all(isinstance(config[k], type(DEFAULT_SESSION[k])) for k in config):
        raise BitpassError(f"{path}: expected the keys {', '.join(DEFAULT_SESSION)} with their default's type")
    level, mode = config.get("graph_optimization_level"), config.get("execution_mode")
    if (level is not None and not hasattr(ort.GraphOptimizationLevel, level)) \
            or (mode is not None and not hasattr(ort.ExecutionMode, mode)) \
            or not 0 <= config.get("intra_op_num_threads", 0) <= 4096 \
            or not _optimizer_names(config.get("disabled_optimizers", [])):
        raise BitpassError(f"{path}: a value is not one ONNX Runtime knows")
    return config


def _optimizer_names(names: Any) -> bool:
    """Whether ``names`` is a short list of optimizer names (letters and digits: nothing else reaches ORT)."""
    return isinstance(names, list) and len(names) <= 32 and all(
        isinstance(n, str) and 0 < len(n) <= 64 and n.isascii() and n.isalnum() for n in names)


#: per kind of ONNX message, its fields that are messages which may hold tensors, and their kind (onnx.proto numbers)
_NESTED = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
#: TensorProto fields that hold its values (float, int32, string, int64, raw, double, uint64 data)
_TENSOR_VALUES = frozenset({4, 5, 6, 7, 9, 10, 11})


def _read_varint(buffer: memoryview, at: int) -> tuple[int, int]:
    """The varint at ``at`` and the offset after it."""
    value = shift = 0
    while True:
        byte = buffer[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _skeleton(buffer: memoryview, kind: str = "model") -> bytes:
    """The serialized message ``buffer`` (an ONNX ``kind``) without its tensors' values, every other field as is:
    a model file read through a memory map parses to the same model minus its weights, whose bytes are never read
    (``onnx.load(load_external_data=False)`` of a 1.6 GB single-file model peaked at 3.1 GB and took 14 s)."""
    nested = _NESTED.get(kind, {})
    out = bytearray()
    at, end = 0, len(buffer)
    while at < end:
        start = at
        key, at = _read_varint(buffer, at)
        key_end = at
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, at = _read_varint(buffer, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, body = _read_varint(buffer, at)
            at = body + length
            if number in nested and at <= end:
                inner = _skeleton(buffer[body:at], nested[number])
                out += buffer[start:key_end]
                out += varint(len(inner)) + inner
                continue
        else:
            raise ValueError(f"wire type {wire} (protobuf groups) in an ONNX file")
        if at > end:
            raise ValueError("a field runs past the end of its message")
        if kind == "tensor" and number in _TENSOR_VALUES:
            continue
        out += buffer[start:at]
    return bytes(out)


def model_skeleton(path: Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` without its tensors' values (dims, types, names and external-data references
    kept), read through a memory map: the weights of a single-file model are neither read nor held."""
    import mmap

    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            stripped = _skeleton(view)
        finally:
            view.release()
    proto = onnx.ModelProto()
    proto.ParseFromString(stripped)
    return proto


def confined_model_path(directory: Path, name: str = "model.onnx") -> Path:
    """``directory/name``, refused if it or any external data it names lies outside ``directory``. Checked on the
    model's skeleton (``model_skeleton``): the weights are not read here, ONNX Runtime reads them once."""
    from google.protobuf.message import DecodeError

    from bitpass.frontend.onnx_import import check_external_data

    directory = Path(directory)
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()) or not path.is_file():
        raise BitpassError(f"{path}: missing, or a link to a file outside the artifact")
    try:
        proto = model_skeleton(path)
    except (DecodeError, ValueError, IndexError, OSError, RuntimeError) as err:
        raise BitpassError(f"{path}: not a readable ONNX file ({str(err)[:100]})") from err
    check_external_data(proto, directory)
    return path


class OrtRunner(Runner):
    """A loaded ONNX Runtime session; feeds by input name, outputs in graph order."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def from_bytes(cls, model: bytes, *, config: Mapping[str, Any] | None = None,
                   threads: int | None = None, for_timing: bool = False) -> OrtRunner:
        return cls(create_session(model, config=config, threads=threads, for_timing=for_timing))

    @classmethod
    def from_path(cls, path: Path, *, config: Mapping[str, Any] | None = None, threads: int | None = None,
                  for_timing: bool = False) -> OrtRunner:
        """A session loaded by path: ONNX Runtime reads external data from beside the file."""
        return cls(create_session(path, config=config, threads=threads, for_timing=for_timing))

    @classmethod
    def from_directory(cls, directory: Path, *, threads: int | None = None, for_timing: bool = False) -> OrtRunner:
        """The artifact's model.onnx, loaded by path so that external data resolves inside ``directory``, after
        checking that every external-data location stays inside it (a hostile artifact cannot read other files)."""
        return cls.from_path(confined_model_path(directory), config=read_session_config(directory), threads=threads,
                             for_timing=for_timing)

    def run_first(self, feeds: Mapping[str, np.ndarray], count: int) -> list[np.ndarray]:
        return self.run(feeds, self.output_names[:count])

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """The outputs in graph order, or those named in ``outputs`` in that order (ONNX Runtime then gathers no
        other: a language model's KV-cache outputs are not made when only its logits are wanted)."""
        if outputs is not None and not outputs:
            return []  # ONNX Runtime would run every output when asked for none
        try:
            chosen = {n: feeds[n] for n in self.input_names}
        except KeyError as err:
            raise BitpassError(f"missing input {err.args[0]!r}; the model takes {', '.join(self.input_names)}") \
                from err
        try:
            return list(self.session.run(list(outputs) if outputs is not None else None, chosen))
        except Exception as err:  # ORT raises its own types (shape mismatch, invalid argument, ...)
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BitpassError(f"ONNX Runtime failed to run the model: {text[:200]}") from err
