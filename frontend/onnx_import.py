"""Import an ONNX file safely: checked, external data confined, old opsets upgraded."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper, version_converter

from bitpass.frontend.errors import ModelLoadError
from bitpass.frontend.model import MIN_IR_VERSION, Model, Provenance, proto_fits_one, proto_sha256

# ONNX Runtime 1.32 writes a device id under ~/.cache/Microsoft/DeveloperTools and a ``.ses`` file in
# TMPDIR when it is imported, unless telemetry is off: bitpass writes nothing outside the user's folder.
# Set before any layer imports onnxruntime (every layer imports the frontend first); a user's own
# ORT_DISABLE_TELEMETRY wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# onnxscript's constant folder (torch's exporter and fold-constants run it) logs each subgraph it cannot
# evaluate as a warning, which Python prints when nothing is configured: noise to a user, unless they asked.
if logging.getLogger("onnxscript").level == logging.NOTSET:
    logging.getLogger("onnxscript").setLevel(logging.ERROR)

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


#: protobuf cannot parse one message of 2 GiB or more: a model file (its graph, with any weights stored inside it)
#: over this is refused before anything is read; weights as external data beside it may be of any size.
MAX_MODEL_BYTES = (1 << 31) - 1
#: a compile holds about this many copies of the weights at its peak (the model, a reference session, the artifact)
WEIGHT_COPIES_AT_PEAK = 3


def memory_limit_bytes() -> int:
    """The memory this process may use: the machine's RAM, or less where an address-space limit is set."""
    import resource

    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(limit, soft) if soft != resource.RLIM_INFINITY else limit


def _short(text: str, limit: int = 60) -> str:
    """A user-controlled string quoted for a one-line message: escaped, shortened in the middle."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[: limit // 2 - 2] + "..." + quoted[-(limit // 2 - 1):]


def _human(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.1f} MiB"


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's data must have, from its dims and type; None for types without a fixed size."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or itemsize == 0:
        return None
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    if tensor.data_type in _SUB_BYTE:
        return (count * _SUB_BYTE[tensor.data_type] + 7) // 8
    return count * itemsize


_SUB_BYTE = {getattr(onnx.TensorProto, name): bits for name, bits in
             (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, name)}


def _external_data_bytes(model: onnx.ModelProto, base_dir: Path, name: str) -> int:
    """Check every external-data reference before anything is read; the bytes they will load.

    Each location must name a regular file inside the model's folder (no absolute paths, no ``..``,
    no link leading out, no NUL), offset and length must be integers that fit the file, and the
    length must match the tensor's dims. Errors name the tensor and what to do.
    """
    root = base_dir.resolve()
    total = 0
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        what = f"{name}: tensor {_short(tensor.name, 40)}"
        info = {}
        for entry in tensor.external_data:
            if entry.key not in ("location", "offset", "length", "checksum", "basepath"):
                raise ModelLoadError(f"{what}: unknown external-data key {entry.key[:40]!r}; the file is damaged")
            info[entry.key] = entry.value
        location = info.get("location", "")
        if not location or "\0" in location:
            raise ModelLoadError(f"{what}: external data location {_short(location)} is empty or holds a NUL byte; "
                                 f"the file is damaged")
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise ModelLoadError(f"{what}: external data path {_short(location)} points outside the model's folder; "
                                 f"bitpass reads weights only from the model's own folder")
        if not target.is_file():
            raise ModelLoadError(f"{what}: external data file {_short(location)} is missing (or not a regular file)")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelLoadError(f"{what}: external data offset/length are not integers; the file is damaged") from None
        size = target.stat().st_size
        if offset < 0 or offset > size:
            raise ModelLoadError(f"{what}: external data offset {offset} is past the end of {_short(location)} "
                                 f"({size} bytes); the model or its data file is truncated or damaged")
        if length is None:
            length = size - offset
        if length < 0 or offset + length > size:
            raise ModelLoadError(f"{what}: external data length {length} at offset {offset} runs past the end of "
                                 f"{_short(location)} ({size} bytes); the data file is truncated or damaged")
        expected = _expected_nbytes(tensor)
        if expected is not None and length != expected:
            raise ModelLoadError(f"{what}: external data holds {length} bytes but its shape "
                                 f"{list(tensor.dims)[:8]} needs {expected}; the model or its data file is damaged")
        total += length
    return total


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Known tensor ranks of the main graph, from declared shapes and then ONNX shape inference."""
    def collect(graph: onnx.GraphProto) -> dict[str, int]:
        found = {}
        for info in [*graph.input, *graph.value_info, *graph.output]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                found[info.name] = len(info.type.tensor_type.shape.dim)
        for tensor in graph.initializer:
            found[tensor.name] = len(tensor.dims)
        return found

    ranks = collect(model.graph)
    try:
        ranks = {**collect(onnx.shape_inference.infer_shapes(model).graph), **ranks}
    except Exception:  # shape inference is a help here, not a requirement
        pass
    return ranks


def _keep_prelu_per_channel(model: onnx.ModelProto, notes: list[str]) -> None:
    """Opset 6 PRelu applied a slope of shape [C] per channel (axis 1); from opset 7 it broadcasts numpy-style
    (against the last axis). Before the upgrade, reshape such slopes to [C, 1, ...] so they stay per channel."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    ranks: dict[str, int] | None = None
    for node in graph.node:
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        slope = initializers.get(node.input[1])
        if slope is None or len(slope.dims) != 1 or slope.dims[0] <= 1:
            continue
        ranks = _ranks(model) if ranks is None else ranks
        rank = ranks.get(node.input[0])
        label = node.name or node.output[0]
        if rank is None:
            raise ModelLoadError(f"PRelu {label[:80]!r}: opset-6 per-channel slope on an input of unknown rank; "
                                 f"cannot keep its meaning through the opset upgrade: give the input a shape")
        if rank <= 2:
            continue  # [N, C] against [C]: the same under both rules
        dims = [slope.dims[0]] + [1] * (rank - 2)
        if uses.get(slope.name, 0) > 1:  # shared: give this PRelu its own reshaped copy
            copy = onnx.TensorProto()
            copy.CopyFrom(slope)
            copy.name = f"{slope.name}_per_channel_{len(graph.initializer)}"
            del copy.dims[:]
            copy.dims.extend(dims)
            graph.initializer.append(copy)
            if model.ir_version < 4:  # IR < 4: every initializer is a graph input too
                graph.input.append(onnx.helper.make_tensor_value_info(copy.name, copy.data_type, dims))
            uses[slope.name] -= 1
            node.input[1] = copy.name
        else:
            del slope.dims[:]
            slope.dims.extend(dims)
            for info in graph.input:  # IR < 4: initializers are listed as inputs too, with their shape
                if info.name == slope.name and info.type.HasField("tensor_type"):
                    shape = info.type.tensor_type.shape
                    del shape.dim[:]
                    for dim in dims:
                        shape.dim.add().dim_value = dim
        notes.append(f"PRelu {label!r}: slope reshaped [{dims[0]}] -> {dims} to stay per-channel after the opset "
                     f"upgrade (opset 7 broadcasts it against the last axis)")


def _upgrade(model: onnx.ModelProto, name: str, notes: list[str]) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_OPSET:
        if opset < 7:
            original, model = model, onnx.ModelProto()
            model.CopyFrom(original)  # the caller's proto stays as it was
            _keep_prelu_per_channel(model, notes)
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
    _check(model, name)
    if sha256 is None:
        sha256 = proto_sha256(model)
    return _wrap(model, name, sha256, kind)


def _check(model: onnx.ModelProto | Path, name: str) -> None:
    """ONNX's checker on a proto, or on a file by path (then it reads the graph itself and only checks that the
    external data files exist: no copy of the weights is made, where a proto is serialized to be checked)."""
    if isinstance(model, onnx.ModelProto) and not proto_fits_one(model):
        import tempfile

        # past protobuf's 2 GiB the checker takes only a path: the graph is written with its weights beside it
        with tempfile.TemporaryDirectory(prefix="bitpass-check-") as folder:
            path = Path(folder) / "model.onnx"
            ir.save(ir.serde.deserialize_model(model), path, external_data="model.onnx.data")
            _check(path, name)
        return
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
    except (onnx.checker.ValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{name}: not a valid ONNX model: {first}") from err


def _wrap(model: onnx.ModelProto, name: str, sha256: str, kind: str, external_dir: Path | None = None) -> Model:
    """A checked proto upgraded and wrapped, each ir tensor owning a copy of its TensorProto (``_detach_tensors``);
    ``external_dir``: the initializers' external data is not loaded yet and is read from there, tensor by tensor,
    into each copy (the ModelProto never holds it: one copy of the weights at the peak)."""
    if not model.graph.output:
        raise ModelLoadError(f"{name}: the graph has no outputs; there is nothing to compile")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > newest:
        raise ModelLoadError(f"{name}: opset {opset} is newer than the newest this onnx {onnx.__version__} knows "
                             f"({newest}); export the model at opset {newest} or lower")
    notes: list[str] = []
    model = _upgrade(model, name, notes)
    stubs = {t.name: t for g in _graph_protos(model.graph) for t in g.initializer} if external_dir else {}
    ir_model = ir.serde.deserialize_model(model)
    _detach_tensors(ir_model, stubs, external_dir)
    return Model(ir_model, Provenance(kind, name, sha256, notes))


def _graph_protos(graph: onnx.GraphProto) -> Any:
    """``graph`` and every subgraph in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graph_protos(sub)


def _detach_tensors(model: ir.Model, stubs: dict[str, onnx.TensorProto] | None = None,
                    external_dir: Path | None = None) -> None:
    """Give each tensor that wraps a TensorProto of the loaded ModelProto its own copy of that TensorProto.

    A wrapped TensorProto keeps the whole ModelProto alive, every weight in it: while any one tensor of the import
    lived (a LayerNorm bias nobody replaces), the imported weights stayed in memory, however many passes had
    replaced them or however the compile let go of them (a 355 M GPT-2: 1.4 GB to the end). Detached, each weight
    goes when its last user does. The copies are the same messages (serialized the same bytes); the ModelProto
    goes when the caller drops it (twice the weights until then)."""
    def detached(tensor: Any, name: str = "") -> Any:
        if isinstance(tensor, ir.ExternalTensor) and external_dir is not None and name in (stubs or {}):
            copy = onnx.TensorProto()
            copy.CopyFrom(stubs[name])  # type, shape, location: no data yet
            external_data_helper.load_external_data_for_tensor(copy, str(external_dir))  # as onnx loads a model
            return ir.serde.TensorProtoTensor(copy)
        if not isinstance(tensor, ir.serde.TensorProtoTensor):
            return tensor
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor.raw)
        return ir.serde.TensorProtoTensor(copy)

    def detach_nodes(nodes: Any) -> None:
        for node in nodes:
            for key, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.serde.TensorProtoTensor):
                    node.attributes[key] = ir.AttrTensor(key, detached(attr.value), doc_string=attr.doc_string)

    for graph in model.graphs():
        for value in graph.initializers.values():
            value.const_value = detached(value.const_value, value.name or "")
        detach_nodes(graph)
    for function in model.functions.values():
        detach_nodes(function.all_nodes())


def from_onnx(path: str | os.PathLike[str]) -> Model:
    """Load an ONNX file; external data may only come from files inside its folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelLoadError(f"{path}: {_human(size)}, over protobuf's 2 GiB limit for one ONNX file; "
                             f"save the weights as external data beside it (onnx.save(..., save_as_external_data=True))")
    data = path.read_bytes()
    _sniff(path, data[:4])
    digest = hashlib.sha256(data).hexdigest()
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{path}: not an ONNX file (truncated or another format): {err}".splitlines()[0]) from err
    del data  # a single-file model's weights: the proto holds them now
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX file (no graph or opset): truncated or another format")
    # every location is confined to the model's folder and fits its file before a byte of it is read; any total
    # size: past 2 GiB bitpass hands the model to ONNX Runtime and onnx by path, with external data
    external = _external_data_bytes(proto, path.parent, path.name)
    limit = memory_limit_bytes()
    if (size + external) * WEIGHT_COPIES_AT_PEAK > limit:
        raise ModelLoadError(f"{path}: {_human(size + external)} of weights with its external data; compiling holds "
                             f"about {WEIGHT_COPIES_AT_PEAK}x that, over the {_human(limit)} of memory this process "
                             f"may use: run it on a machine with more memory (nothing was read)")
    # checked by path before the weights are read: checking the proto would serialize it (two more copies)
    _check(path, path.name)
    # the initializers' external data is read tensor by tensor into each tensor's own proto as the model is wrapped;
    # all at once into this proto only where the opset converter must see it, or a Constant node holds some
    by_tensor = not _upgrade_needed(proto) and not any(
        external_data_helper.uses_external_data(t) for t in external_data_helper._get_attribute_tensors(proto))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if by_tensor:
                return _wrap(proto, path.name, digest, "onnx", external_dir=path.parent)
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as err:  # onnx raises ValueError for bounds and names, OSError for the file
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path}: cannot read external data: {text[:160]}") from err
    return _wrap(proto, path.name, digest, "onnx")


def _upgrade_needed(model: onnx.ModelProto) -> bool:
    """Whether ``_upgrade`` runs onnx's opset converter on ``model`` (which reads every tensor)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return opset is not None and opset < MIN_OPSET


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse a model whose external data would be read from outside ``base_dir``, or is damaged (public:
    runners check an artifact's model with it before ONNX Runtime loads it by path)."""
    _external_data_bytes(model, Path(base_dir), "model.onnx")
