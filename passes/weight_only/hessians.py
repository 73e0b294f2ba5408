"""Layer-local Hessians ``X^T X / n`` of an ONNX model's linear layers, from calibration data run in ONNX Runtime.

What GPTQ and salience-driven widths need of each layer is the Gram matrix of its own inputs over the
calibration samples (``calibration.py`` gets the same from a torch module with forward hooks). Here every
layer input becomes an extra graph output of one session, the calibration set runs through it batch by
batch, and each batch is folded into float32 accumulators and dropped: memory is the Hessians
(``sum of K^2``, one per distinct input tensor: layers reading the same tensor, such as a Llama block's
q/k/v projections, share one) plus one batch of activations, never the whole set; and past ``MAX_GRAM_BYTES``
of Hessians, only one group of them at a time (the data runs once per group).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir.passes.common as ir_passes
import onnxruntime as ort

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes import execution

#: tokens (positions x samples) per calibration batch: one batch's layer inputs, and ONNX Runtime's arena that made
#: them, are each ``tokens x sum of widths`` floats (GPT-2-medium, all 97 at 1024 tokens: 0.7 GB each; the
#: collection then peaked at 2.4 GB, 1.8 GB at 512 tokens, for about 10 % more CPU time)
TOKENS_PER_BATCH = 512


class Gram:
    """``X^T X`` and the row count over chunks of rows, in float32 (a 4096-wide layer: 64 MB)."""

    def __init__(self, features: int) -> None:
        self.sum = np.zeros((features, features), np.float32)
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        rows = np.asarray(x, np.float32).reshape(-1, self.sum.shape[0])
        self.sum += rows.T @ rows
        self.count += rows.shape[0]

    @property
    def value(self) -> np.ndarray:
        """``X^T X / n`` in float32, as accumulated: the float64 a consumer makes of it is the same numbers, and
        a model's Hessians held at once take half the memory (GPT-2-medium's 97 layers: 1.9 GB, not 3.8 GB)."""
        return self.sum / np.float32(max(self.count, 1))


def batch_size_for(data: Dataset, tokens: int = TOKENS_PER_BATCH) -> int:
    """Samples per batch so that a batch holds about ``tokens`` positions (sequence inputs: samples x length)."""
    ids = next(iter(data.inputs.values()))
    length = int(ids.shape[1]) if ids.ndim >= 2 else 1
    return max(1, tokens // max(length, 1))


#: bytes of float32 Gram accumulators held at once while collecting: when a model's layer inputs need more (a
#: 709 M GPT-2's 48 Hessians are 3.6 GB, 12 GB at the collection's peak with the session and activations), they are
#: collected in groups of consecutive tensors that fit, one pass of the calibration data per group through the
#: same session, and each group's Hessians are handed on before the next group starts
MAX_GRAM_BYTES = 1 << 30


def layer_input_hessians(model: Model, inputs: Sequence[str], data: Dataset, *, samples: int | None = None,
                         max_bytes: int | None = None,
                         progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """``{tensor name: X^T X / n}`` of each named layer-input tensor (last axis = features) over ``data``
    (its first ``samples`` samples when given); ``iter_layer_input_hessians`` hands them on group by group."""
    return dict(iter_layer_input_hessians(model, inputs, data, samples=samples, max_bytes=max_bytes,
                                          progress=progress))


def iter_layer_input_hessians(model: Model, inputs: Sequence[str], data: Dataset, *, samples: int | None = None,
                              max_bytes: int | None = None, progress: Callable[[str], None] | None = None
                              ) -> Iterator[tuple[str, np.ndarray]]:
    """``(tensor name, X^T X / n)`` of each named layer-input tensor, in order, with at most ``max_bytes`` of
    accumulators alive (``gram_groups``; default ``MAX_GRAM_BYTES``; a tensor wider than that alone): the consumer stores or uses each before
    the next group is collected. Every group sees the same batches in the same order, so each Hessian is the same
    float32 numbers whatever the grouping."""
    if len(data) == 0:
        raise UsageError("weight-only GPTQ needs calibration samples (--calib)")
    used = data.head(samples) if samples else data
    names = list(dict.fromkeys(inputs))
    groups = gram_groups(model, names, MAX_GRAM_BYTES if max_bytes is None else max_bytes)
    batch = batch_size_for(used)
    total = -(-len(used) // batch)
    with layer_input_runner(model, names) as run:
        for number, group in enumerate(groups, 1):
            grams: dict[str, Gram] = {}
            for index, values in enumerate(run(used, group, batch_size=batch)):
                for name in group:
                    x = values[name]
                    if name not in grams:
                        grams[name] = Gram(int(x.shape[-1]))
                    grams[name].add(x)
                del values
                if progress is not None and (index + 1) % 8 == 0:
                    where = f" (group {number}/{len(groups)})" if len(groups) > 1 else ""
                    progress(f"quantize-weights: layer inputs of batch {index + 1}/{total}{where}")
            for name in group:
                yield name, grams.pop(name).value


def gram_groups(model: Model, names: Sequence[str], max_bytes: int) -> list[list[str]]:
    """``names`` cut into runs of consecutive tensors whose float32 ``features x features`` accumulators fit in
    ``max_bytes`` together (one that does not fit alone, or whose width the graph does not say, is a group of its
    own)."""
    widths = _last_dims(model)
    groups: list[list[str]] = []
    held = 0
    for name in names:
        width = widths.get(name)
        size = 4 * width * width if width else max_bytes + 1
        if not groups or held + size > max_bytes:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    return groups


def _last_dims(model: Model) -> dict[str, int]:
    """``{tensor name: its last dimension}`` where the graph gives it as a number."""
    graph = model.ir.graph
    values = [*graph.inputs, *(v for node in graph for v in node.outputs)]
    return {v.name: int(v.shape[-1]) for v in values
            if v.name and v.shape is not None and len(v.shape) and isinstance(v.shape[-1], int)}


def layer_inputs(model: Model, data: Dataset, names: Sequence[str], *,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of ``data``: ``{name: value}`` of each tensor in ``names`` (``layer_input_runner``, one pass)."""
    with layer_input_runner(model, names) as run:
        yield from run(data, names, batch_size=batch_size)


@contextlib.contextmanager
def layer_input_runner(model: Model, names: Sequence[str]
                       ) -> Iterator[Callable[..., Iterator[dict[str, np.ndarray]]]]:
    """A function ``run(data, fetch, *, batch_size)`` giving, per batch of ``data``, ``{name: value}`` of each
    tensor in ``fetch`` (a subset of ``names``), from one ONNX Runtime session that may serve several passes over
    the data, with bounded memory: the model (its inner tensors made outputs on a clone that shares the weights)
    is written with external data to a temporary folder and ONNX Runtime loads it by path, so no serialized copy
    of the weights is held (a 1.4 GB model's would be three: the proto, its bytes, ORT's parse), and weight
    pre-packing is off (one more copy, for a session that runs a few batches). The clone's only outputs are the
    wanted tensors and the nodes they do not depend on are dropped: a language model's logits (its widest layer,
    a quarter of GPT-2-small's compute) and KV-cache outputs are not computed."""
    work = model.clone()
    graph = work.ir.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    missing = [n for n in dict.fromkeys(names) if n not in values]
    if missing:
        raise UsageError(f"quantize-weights: no tensor {missing[0]!r} in the model to collect layer inputs from")
    inputs = {v.name for v in graph.inputs}
    outputs = [n for n in dict.fromkeys(names) if n not in inputs]
    if not outputs:  # every layer reads a graph input: the data is the answer
        def from_data(data: Dataset, fetch: Sequence[str], *, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
            for feeds in data.batches(batch_size):
                yield {n: feeds[n] for n in fetch}
        yield from_data
        return
    graph.outputs.clear()
    graph.outputs.extend(values[n] for n in outputs)
    ir_passes.RemoveUnusedNodesPass()(work.ir)
    with tempfile.TemporaryDirectory(prefix="bitpass-hessians-") as folder:
        path = Path(folder) / "model.onnx"
        work.save_external(path)  # which drops the pages of paged-out weights (``tools.api``) it read
        del work, graph, values
        options = execution.session_options()
        options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            session = ort.InferenceSession(str(path), options, providers=execution.PROVIDERS)
        except Exception as err:  # ORT raises its own exception types
            raise BitpassError(f"ONNX Runtime cannot run the model to collect layer inputs: "
                               f"{execution.first_line(err)}") from err
        wanted = {i.name for i in session.get_inputs()}

        def from_session(data: Dataset, fetch: Sequence[str], *,
                         batch_size: int) -> Iterator[dict[str, np.ndarray]]:
            computed = [n for n in dict.fromkeys(fetch) if n not in inputs]
            for feeds in data.batches(batch_size):
                # a group of graph inputs only runs nothing (ORT runs every output when asked for none)
                got = dict(zip(computed, session.run(computed, {n: v for n, v in feeds.items() if n in wanted}))) \
                    if computed else {}
                got.update({n: feeds[n] for n in fetch if n in inputs})
                yield got
        yield from_session


class SpilledArrays(Mapping[Hashable, np.ndarray]):
    """Arrays kept in ``.npy`` files of a private temporary folder and read back on each access: what a memo holds
    between uses without holding it in memory (GPT-2-medium's Hessians are 1.9 GB; between the rounding and a
    quality-gate repair that reuses them they are file pages the kernel may drop, not process memory). The
    folder goes when the object does."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="bitpass-spilled-")
        self._files: dict[Hashable, Path] = {}

    @property
    def folder(self) -> Path:
        return Path(self._folder.name)

    def __setitem__(self, key: Hashable, value: np.ndarray) -> None:
        path = self.folder / f"{len(self._files)}.npy"
        np.save(path, np.asarray(value), allow_pickle=False)
        self._files[key] = path

    def __getitem__(self, key: Hashable) -> np.ndarray:
        return np.load(self._files[key], allow_pickle=False)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class Renamed(Mapping[str, np.ndarray]):
    """``{name: store[keys[name]]}``, read from ``store`` on each access (layer ids onto a memo's keys)."""

    def __init__(self, store: Mapping[Hashable, np.ndarray], keys: Mapping[str, Hashable]) -> None:
        self._store, self._keys = store, dict(keys)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._store[self._keys[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
