"""Import an ONNX file safely: checked, external data confined, old opsets upgraded."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper, version_converter

from bitpass.frontend.errors import ModelLoadError
from bitpass.frontend.model import MIN_IR_VERSION, Model, Provenance

# ONNX Runtime 1.32 writes a device id under ~/.cache/Microsoft/DeveloperTools and a ``.ses`` file in
# TMPDIR when it is imported, unless telemetry is off: bitpass writes nothing outside the user's folder.
# Set before any layer imports onnxruntime (every layer imports the frontend first); a user's own
# ORT_DISABLE_TELEMETRY wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: Models below this default-domain opset are upgraded with onnx's version converter.
MIN_OPSET = 17

_PICKLE_HINT = (
    "looks like a PyTorch checkpoint (pickle/zip), not ONNX; bitpass never unpickles files: "
    "load the module yourself and pass it to bitpass.compile(module, example_inputs=...)"
)


def _sniff(path: Path, head: bytes) -> None:
    if not head:
        raise ModelLoadError(f"{path}: file is empty")
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise ModelLoadError(f"{path}: {_PICKLE_HINT}")


def _confine_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that resolve outside the model's folder."""
    root = base_dir.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise ModelLoadError(
                f"tensor {tensor.name!r}: external data path {location!r} points outside the model's folder {root}"
            )
        if not target.is_file():
            raise ModelLoadError(f"tensor {tensor.name!r}: external data file {location!r} is missing")


def _upgrade(model: onnx.ModelProto, name: str, notes: list[str]) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as err:  # the converter raises bare RuntimeErrors
            raise ModelLoadError(f"{name}: cannot upgrade opset {opset} to {MIN_OPSET}: {err}".splitlines()[0]) from err
        notes.append(f"opset upgraded {opset} -> {MIN_OPSET}")
    if model.ir_version < MIN_IR_VERSION:
        notes.append(f"IR version raised {model.ir_version} -> {MIN_IR_VERSION}")
        model.ir_version = MIN_IR_VERSION
    return model


def from_proto(model: onnx.ModelProto, *, name: str = "<ModelProto>", sha256: str | None = None,
               kind: str = "proto") -> Model:
    """Check, upgrade and wrap a ModelProto whose external data is already loaded."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{name}: not a valid ONNX model: {first}") from err
    if sha256 is None:
        sha256 = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    notes: list[str] = []
    model = _upgrade(model, name, notes)
    ir_model = ir.serde.deserialize_model(model)
    return Model(ir_model, Provenance(kind, name, sha256, notes))


def from_onnx(path: str | os.PathLike[str]) -> Model:
    """Load an ONNX file; external data may only come from files inside its folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    data = path.read_bytes()
    _sniff(path, data[:4])
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{path}: not an ONNX file (truncated or another format): {err}".splitlines()[0]) from err
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX file (no graph or opset): truncated or another format")
    _confine_external_data(proto, path.parent)
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read external data: {err}") from err
    return from_proto(proto, name=path.name, sha256=hashlib.sha256(data).hexdigest(), kind="onnx")
