"""``Model``: the one graph IR of bitpass, a thin facade over ``onnx_ir.Model``.

There is no second IR. Passes mutate ``model.ir`` (onnx-ir) directly; this
class adds what every layer needs: the layer list, input specs, deterministic
bytes, and a networkx view built on demand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir

from bitpass.frontend import annotation
from bitpass.frontend.errors import BitpassError
from bitpass.frontend.layers import Layer, assign_layer_ids, quantizable_layers

#: Node-level metadata_props are saved only from ONNX IR version 10 on.
MIN_IR_VERSION = 10

#: protobuf refuses to serialize or parse a message of 2 GiB or more
PROTOBUF_LIMIT_BYTES = (1 << 31) - 1
#: models whose constant tensors hold more bytes than this are never made one protobuf: they are saved with external
#: data and handed to ONNX Runtime and onnx by path (the rest of the limit is room for the graph itself). Tests lower
#: it to send small models down the same path.
SINGLE_PROTO_MAX_WEIGHT_BYTES = PROTOBUF_LIMIT_BYTES - (64 << 20)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (ints, or strings for symbolic dims), numpy dtype."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: np.dtype

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join(str(d) for d in self.shape)
        return f"{self.name}[{dims}] {self.dtype}"


@dataclass
class Provenance:
    """Where a model came from, for the manifest."""

    kind: str  # "onnx", "torch" or "proto"
    name: str
    sha256: str
    notes: list[str] = field(default_factory=list)


def _spec(value: ir.Value) -> TensorSpec:
    shape = None
    if value.shape is not None:
        shape = tuple(d if isinstance(d, int) else (str(d) if d.value is not None else None) for d in value.shape)
    dtype = value.dtype.numpy() if value.dtype is not None else np.dtype("float32")
    return TensorSpec(value.name or "", shape, np.dtype(dtype))


#: initializers of at least this many bytes are serialized one at a time by ``write_streamed``
_STREAMED_BYTES = 1 << 16


def varint(value: int) -> bytes:
    """``value`` as a protobuf base-128 varint (the bytes a key or a length is written as)."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload_size: int) -> bytes:
    """The key and length of a length-delimited protobuf field (wire type 2)."""
    return varint(number << 3 | 2) + varint(payload_size)


#: field numbers of ``ModelProto.graph`` and ``GraphProto.initializer`` (onnx.proto)
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5


def _tensor_bytes(tensor: ir.TensorProtocol, name: str) -> bytes:
    """One initializer as serialized ``TensorProto`` bytes, its data inline (a memory-mapped external tensor too),
    named ``name``: its value's name, as ``serialize_model`` names initializers (a pass that gives a value a new
    tensor, ``ir.tensor(array)``, may leave the tensor itself unnamed or named otherwise)."""
    if isinstance(tensor, PagedTensor):
        return tensor.serialized(name)
    if isinstance(tensor, ir.ExternalTensor):
        tensor = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string,
                           metadata_props=dict(tensor.metadata_props))
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name
    return proto.SerializeToString(deterministic=True)


def write_streamed(model: ir.Model, handle: Any) -> int:
    """Write ``model`` as one ONNX protobuf to the binary file ``handle``; the bytes written.

    The graph is serialized with its large initializers as external-data stubs (no data copied), then each
    initializer is written after it, serialized on its own: memory holds one tensor's bytes at a time, where
    ``SerializeToString`` of the whole model holds the model two or three times more. Each large tensor is
    serialized twice (once for the graph's length prefix): CPU traded for memory. The file parses as the same
    model (protobuf merges a message's fields in any order; the main graph's initializers keep their order, after
    its other fields), and its bytes are a function of the model alone (deterministic)."""
    work = model.clone()  # shares the tensors; its initializer values take stubs, the model is untouched
    real: dict[str, ir.TensorProtocol] = {}
    for value in work.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes >= _STREAMED_BYTES and value.name:
            real[value.name] = tensor
            value.const_value = ir.ExternalTensor("bitpass-streamed", 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name)
    proto = ir.serde.serialize_model(work)
    del work
    stubs = list(proto.graph.initializer)
    small = {t.name: t.SerializeToString(deterministic=True) for t in stubs if t.name not in real}
    del proto.graph.initializer[:]
    graph = proto.graph.SerializeToString(deterministic=True)
    proto.ClearField("graph")
    head = proto.SerializeToString(deterministic=True)
    lengths = [len(small[t.name]) if t.name not in real else len(_tensor_bytes(real[t.name], t.name)) for t in stubs]
    graph_size = len(graph) + sum(len(_field(_GRAPH_INITIALIZER, n)) + n for n in lengths)
    written = handle.write(head) + handle.write(_field(_MODEL_GRAPH, graph_size)) + handle.write(graph)
    for stub, length in zip(stubs, lengths):
        piece = small[stub.name] if stub.name not in real else _tensor_bytes(real[stub.name], stub.name)
        if len(piece) != length:  # a tensor changed while being written
            raise RuntimeError(f"initializer {stub.name!r} serialized to {len(piece)} bytes, then {length}")
        written += handle.write(_field(_GRAPH_INITIALIZER, length)) + handle.write(piece)
        del piece
    return written


class _Hasher:
    """A binary "file" that only hashes what is written to it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)


def proto_fits_one(proto: onnx.ModelProto) -> bool:
    """``Model.fits_one_proto`` for a ModelProto: whether the bytes of its main graph's initializers are within
    ``SINGLE_PROTO_MAX_WEIGHT_BYTES`` (else it is saved with external data and handed on by path)."""
    weight_bytes = sum(len(t.raw_data) or 4 * (len(t.float_data) + len(t.int32_data)) + 8 * len(t.int64_data)
                       for t in proto.graph.initializer)
    return weight_bytes <= SINGLE_PROTO_MAX_WEIGHT_BYTES


def save_proto(proto: onnx.ModelProto, path: str | Path) -> None:
    """``onnx.save``, with the weights in ``<name>.data`` beside ``path`` when they are past protobuf's 2 GiB
    (``SINGLE_PROTO_MAX_WEIGHT_BYTES``); ``onnx.load(path)`` reads either back. Past the limit onnx moves the
    weights out of ``proto`` as it writes them: read the file, not ``proto``, afterwards."""
    path = Path(path)
    if proto_fits_one(proto):
        onnx.save(proto, str(path))
    else:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)


def proto_sha256(proto: onnx.ModelProto) -> str:
    """The sha256 of ``proto``'s deterministic serialization; past protobuf's 2 GiB (which cannot be serialized)
    of the stream ``write_streamed`` writes for it instead, the weights hashed tensor by tensor without a copy."""
    if proto_fits_one(proto):
        return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    hasher = _Hasher()
    write_streamed(ir.serde.deserialize_model(proto), hasher)  # the ir tensors wrap the proto's: no copy
    return hasher.digest.hexdigest()


class Model:
    """An ONNX model in memory with bitpass annotations."""

    def __init__(self, ir_model: ir.Model, provenance: Provenance, torch_module: Any = None) -> None:
        self.ir = ir_model
        self.provenance = provenance
        #: the nn.Module this model was exported from (gradient-based passes use it; never saved).
        #: Layer ids of a torch export are module paths, so ``get_submodule(layer.id)`` finds a layer.
        self.torch_module = torch_module
        if self.ir.ir_version < MIN_IR_VERSION:
            self.ir.ir_version = MIN_IR_VERSION
        assign_layer_ids(self.ir.graph)
        annotation.stamp_schema(self.ir)

    # --- structure -------------------------------------------------------
    @property
    def graph(self) -> ir.Graph:
        return self.ir.graph

    def layers(self) -> list[Layer]:
        """Quantizable units in topological order."""
        return quantizable_layers(self.ir.graph)

    def layer(self, layer_id: str) -> Layer:
        for layer in self.layers():
            if layer.id == layer_id:
                return layer
        raise KeyError(f"no layer {layer_id!r}; layers are: {', '.join(l.id for l in self.layers())}")

    @property
    def inputs(self) -> list[TensorSpec]:
        return [_spec(v) for v in self.ir.graph.inputs if v.const_value is None]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(v) for v in self.ir.graph.outputs]

    @property
    def opset(self) -> int:
        return self.ir.opset_imports.get("", 1)

    def weight_bytes(self) -> int:
        """Bytes of all constant tensors (initializers and Constant nodes), as stored."""
        total = 0
        for value in self.ir.graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
        for node in self.ir.graph.all_nodes():
            if node.op_type == "Constant" and (attr := node.attributes.get("value")) is not None:
                if attr.type == ir.AttributeType.TENSOR:
                    total += attr.as_tensor().nbytes
        return total

    def networkx(self) -> nx.DiGraph:
        """A fresh DiGraph of nodes (by index in topological order) for graph analyses."""
        nodes = list(self.ir.graph)
        index = {id(n): i for i, n in enumerate(nodes)}
        view = nx.DiGraph()
        for i, node in enumerate(nodes):
            view.add_node(i, op_type=node.op_type, name=node.name, layer_id=annotation.layer_id(node))
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and id(producer) in index:
                    view.add_edge(index[id(producer)], i, tensor=value.name)
        return view

    # --- serialization ---------------------------------------------------
    def to_proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.ir)

    def fits_one_proto(self) -> bool:
        """Whether the model can be one protobuf (``to_bytes``, a single-file ``save``); else it travels as a file
        with external data (``save_external``), by path (``SINGLE_PROTO_MAX_WEIGHT_BYTES``)."""
        return self.weight_bytes() <= SINGLE_PROTO_MAX_WEIGHT_BYTES

    def to_bytes(self) -> bytes:
        """Deterministic protobuf bytes: the same model always gives the same bytes (the bytes ``save`` writes,
        built tensor by tensor: the model once more at the peak, not three times). A model over protobuf's 2 GiB
        has no such bytes: ``BitpassError`` (save it with ``save_external`` and load it by path)."""
        import io

        if not self.fits_one_proto():
            raise BitpassError(f"{self.provenance.name}: {self.weight_bytes() / (1 << 30):.2f} GiB of weights cannot "
                               f"be serialized into one protobuf (protobuf's 2 GiB limit); bitpass saves such models "
                               f"with external data: this is a bug, please report it")
        buffer = io.BytesIO()
        write_streamed(self.ir, buffer)
        return buffer.getvalue()

    def sha256(self) -> str:
        """A digest of the model's deterministic serialization, hashed as it is written (any size: no bytes held)."""
        hasher = _Hasher()
        write_streamed(self.ir, hasher)
        return hasher.digest.hexdigest()

    def save(self, path: str | Path) -> list[str]:
        """Write the model to ``path``; the names of the files written (in ``path``'s folder).

        One ONNX file, initializer by initializer (``write_streamed``): a serialized copy of the whole model is
        never held (``to_bytes`` holds three at its peak: a 650 MB GPT-2 took 1.9 GB more). A model over protobuf's
        2 GiB (``fits_one_proto``) is written as ``save_external`` writes it: its weights in ``<name>.data``."""
        path = Path(path)
        if not self.fits_one_proto():
            self.save_external(path)
            return [path.name, path.name + ".data"]
        with path.open("wb") as handle:
            write_streamed(self.ir, handle)
        drop_pages_of(self)  # paged-out weights were read to be written: not kept resident
        return [path.name]

    def save_external(self, path: str | Path) -> int:
        """Write the model to ``path`` with its weights in ``<name>.data`` beside it; the bytes of both files.

        Written tensor by tensor: no serialized copy of the whole model is held in memory (a BERT-base model's is
        440 MB, twice over while protobuf writes it), and ONNX Runtime loads the file by path."""
        path = Path(path)
        data = path.with_name(path.name + ".data")
        ir.save(self.ir, path, external_data=data.name, size_threshold_bytes=1024)
        drop_pages_of(self)  # paged-out weights were read to be written: not kept resident (``PagedWeights``)
        return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)

    @classmethod
    def read_back(cls, path: str | Path, provenance: Provenance, torch_module: Any = None) -> Model:
        """The model ``save_external`` wrote to ``path``, its weights loaded into memory (the files may go):
        serialized, the same bytes as the model that was written."""
        loaded = ir.load(Path(path))
        external = [v.const_value for g in loaded.graphs() for v in g.initializers.values()
                    if isinstance(v.const_value, ir.ExternalTensor)]
        ir.external_data.load_to_model(loaded)  # in-memory tensors, serialized as the ones written were
        for tensor in external:
            tensor.release()  # close the memory maps of the files
        return cls(loaded, provenance, torch_module)

    def clone(self) -> Model:
        """An independent copy of the graph (nodes, values, annotations) that shares the constant tensors.

        No serialization round trip: a BERT-base-size model is not copied (440 MB) per clone. Tensors are
        immutable by convention: a pass changes a weight by giving its value a new ``const_value``
        (``ir.tensor(array)``), never by writing into the array behind one."""
        copy = self.ir.clone()
        return Model(copy, Provenance(self.provenance.kind, self.provenance.name, self.provenance.sha256,
                                      list(self.provenance.notes)), self.torch_module)

    def __repr__(self) -> str:
        return (f"Model({self.provenance.name!r}, opset={self.opset}, nodes={len(self.ir.graph)}, "
                f"layers={len(self.layers())})")


#: offsets of paged-out tensors in their file are multiples of this (aligned arrays for numpy and the kernels)
_PAGE_ALIGN = 64
#: TensorProto fields that hold values other than ``raw_data``: a tensor stored in them is not paged out
_OTHER_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


class PagedTensor(ir.Tensor):
    """An ``ir.Tensor`` over memory-mapped bytes (``PagedWeights``) that ``Model.save`` and ``Model.sha256`` serialize
    as the tensor it replaced: an imported ``TensorProto`` keeps its own fields (``data_location`` set to DEFAULT
    among them, which a plain ``ir.Tensor`` does not write)."""

    def __init__(self, array: np.ndarray, replaced: ir.TensorProtocol) -> None:
        super().__init__(array, dtype=replaced.dtype, name=replaced.name, doc_string=replaced.doc_string,
                         metadata_props=dict(replaced.metadata_props))
        self.header: bytes | None = None
        if isinstance(replaced, ir.serde.TensorProtoTensor):
            proto = onnx.TensorProto()
            proto.CopyFrom(replaced.raw)
            proto.ClearField("raw_data")
            self.header = proto.SerializeToString(deterministic=True)

    def serialized(self, name: str) -> bytes:
        """The ``TensorProto`` bytes the replaced tensor serialized to, named ``name`` (``_tensor_bytes``)."""
        if self.header is None:
            proto = ir.serde.serialize_tensor(self)
        else:
            proto = onnx.TensorProto.FromString(self.header)
            proto.raw_data = self.tobytes()
        proto.name = name
        return proto.SerializeToString(deterministic=True)


def _pageable(tensor: ir.TensorProtocol | None) -> bool:
    """Whether ``tensor`` can be paged out and serialize the same bytes: a plain ``ir.Tensor`` over a numpy array,
    or an imported ``TensorProto`` holding whole-byte values in ``raw_data`` (those bytes are its array's)."""
    if tensor is None or tensor.nbytes < _STREAMED_BYTES or tensor.dtype.bitwidth % 8 or \
            tensor.dtype == ir.DataType.STRING or isinstance(tensor, PagedTensor) or np.little_endian is False:
        return False
    if isinstance(tensor, ir.serde.TensorProtoTensor):
        raw = tensor.raw
        return raw.HasField("raw_data") and raw.data_location != onnx.TensorProto.EXTERNAL \
            and not any(len(getattr(raw, name)) for name in _OTHER_VALUE_FIELDS)
    return type(tensor) is ir.Tensor and isinstance(tensor.raw, np.ndarray)


class PagedWeights:
    """Weights a compile holds only to read again later, moved out of its memory into a scratch file in ``folder``
    and read back through a read-only memory map.

    After the passes a compile keeps models it reads rarely (the emitted one for the manifest and the quality gate's
    ranking, the one before quantizing for a repair): a 355 M decoder's 1.4 GB of fp32 weights stayed in memory
    beside the artifact's ONNX Runtime session. Paged out, a tensor is a ``PagedTensor`` (an ``ir.Tensor``) over the
    mapped bytes: an ONNX Runtime session, the onnx checker and every pass see the same values, and ``Model.save``
    writes the same bytes (an earlier attempt with ``ir.ExternalTensor`` wrote external-data references that
    nothing could resolve). Its pages are file-backed: ``drop_pages`` lets go of those this process has read (emitting
    a model reads every weight). Each file is removed once mapped: the map keeps its pages."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._maps: list[Any] = []

    def page_out(self, *models: Model) -> int:
        """Move the large main-graph initializers of ``models`` (``_pageable``; a tensor they share, once) into a new
        file; the bytes moved."""
        import mmap

        path = self.folder / f"paged-{len(self._maps)}.bin"
        entries: dict[int, tuple[ir.TensorProtocol, int, np.dtype, tuple[int, ...]]] = {}
        offset = 0
        with path.open("wb") as handle:
            for model in models:
                for value in model.ir.graph.initializers.values():
                    tensor = value.const_value
                    if id(tensor) in entries or not _pageable(tensor):
                        continue
                    assert tensor is not None
                    array = np.ascontiguousarray(tensor.numpy())
                    pad = -offset % _PAGE_ALIGN
                    handle.write(b"\0" * pad)
                    offset += pad
                    handle.write(array.view(np.uint8).reshape(-1).data)
                    entries[id(tensor)] = (tensor, offset, array.dtype, array.shape)
                    offset += array.nbytes
                    del array
        if not entries:
            path.unlink()
            return 0
        with path.open("rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        path.unlink()  # the map keeps the file's pages: nothing is left behind, whenever the folder goes
        self._maps.append(mapped)
        swapped = {key: PagedTensor(np.frombuffer(mapped, dtype, int(np.prod(shape, dtype=np.int64)), start)
                                    .reshape(shape), tensor)
                   for key, (tensor, start, dtype, shape) in entries.items()}
        entries.clear()
        for model in models:
            for value in model.ir.graph.initializers.values():
                paged = swapped.get(id(value.const_value))
                if paged is not None:
                    value.const_value = paged
        release_freed_memory()
        return sum(t.nbytes for t in swapped.values())

    def drop_pages(self) -> None:
        """Let go of the mapped pages this process has read (``MADV_DONTNEED``: they stay in the page cache, and a
        later read maps them again): emitting a model reads every paged-out weight once."""
        import mmap

        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)


def drop_pages_of(model: Model) -> None:
    """Let go of the mapped pages of ``model``'s paged-out weights this process has read (``drop_mapped_pages``): a
    model just written to a file, for an ONNX Runtime session that holds its own copy, does not stay resident."""
    drop_mapped_pages(t.numpy() for v in model.ir.graph.initializers.values()
                      if isinstance(t := v.const_value, PagedTensor))


def drop_mapped_pages(arrays: Iterable[Any]) -> None:
    """Let go of the pages this process has read of each array that views a read-only memory map (a paged-out weight,
    a prediction gathered in a file: ``MADV_DONTNEED``; they stay in the file and a later read maps them again);
    other arrays are left as they are."""
    import mmap

    maps = {}
    for array in arrays:
        base: object = array
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
            maps[id(base.obj)] = base.obj
    for mapped in maps.values():
        mapped.madvise(mmap.MADV_DONTNEED)


def release_freed_memory() -> None:
    """Hand memory freed by Python back to the system (glibc's ``malloc_trim``; nothing elsewhere). Weights of 4-16 MB
    live in malloc's heap once its mmap threshold has risen, and freeing them left the pages with the process: at
    355 M, paging out 1.5 GB of weights lowered the resident size by 0.8 GB, and by 1.6 GB with a trim after it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
