"""Layer-local Hessians ``X^T X / n`` of an ONNX model's linear layers, from calibration data run in ONNX Runtime.

What GPTQ and salience-driven widths need of each layer is the Gram matrix of its own inputs over the
calibration samples (``calibration.py`` gets the same from a torch module with forward hooks). Here every
layer input becomes an extra graph output of one session, the calibration set runs through it batch by
batch, and each batch is folded into float32 accumulators and dropped: memory is the Hessians
(``sum of K^2``, one per distinct input tensor: layers reading the same tensor, such as a Llama block's
q/k/v projections, share one) plus one batch of activations, never the whole set.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir.passes.common as ir_passes
import onnxruntime as ort

from bitpass.frontend import Dataset, Model
from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes import execution

#: tokens (positions x samples) per calibration batch: activations of one batch stay tens of MB
TOKENS_PER_BATCH = 1024


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


def layer_input_hessians(model: Model, inputs: Sequence[str], data: Dataset, *, samples: int | None = None,
                         progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """``{tensor name: X^T X / n}`` of each named layer-input tensor (last axis = features) over ``data``
    (its first ``samples`` samples when given)."""
    if len(data) == 0:
        raise UsageError("weight-only GPTQ needs calibration samples (--calib)")
    used = data.head(samples) if samples else data
    names = list(dict.fromkeys(inputs))
    grams: dict[str, Gram] = {}
    batch = batch_size_for(used)
    total = -(-len(used) // batch)
    for index, values in enumerate(layer_inputs(model, used, names, batch_size=batch)):
        for name in names:
            x = values[name]
            if name not in grams:
                grams[name] = Gram(int(x.shape[-1]))
            grams[name].add(x)
        if progress is not None and (index + 1) % 8 == 0:
            progress(f"quantize-weights: layer inputs of batch {index + 1}/{total}")
    return {name: gram.value for name, gram in grams.items()}


def layer_inputs(model: Model, data: Dataset, names: Sequence[str], *,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of ``data``: ``{name: value}`` of each tensor in ``names``, with bounded memory: the model (its
    inner tensors made outputs on a clone that shares the weights) is written with external data to a temporary
    folder and ONNX Runtime loads it by path, so no serialized copy of the weights is held (a 1.4 GB model's
    would be three: the proto, its bytes, ORT's parse), and weight pre-packing is off (one more copy, for a
    session that runs a few batches). The clone's only outputs are the wanted tensors and the nodes they do not
    depend on are dropped: a language model's logits (its widest layer, a quarter of GPT-2-small's compute) and
    KV-cache outputs are not computed."""
    work = model.clone()
    graph = work.ir.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    missing = [n for n in dict.fromkeys(names) if n not in values]
    if missing:
        raise UsageError(f"quantize-weights: no tensor {missing[0]!r} in the model to collect layer inputs from")
    inputs = {v.name for v in graph.inputs}
    fetch = [n for n in dict.fromkeys(names) if n not in inputs]
    if not fetch:  # every layer reads a graph input: the data is the answer
        for feeds in data.batches(batch_size):
            yield {n: feeds[n] for n in names}
        return
    graph.outputs.clear()
    graph.outputs.extend(values[n] for n in fetch)
    ir_passes.RemoveUnusedNodesPass()(work.ir)
    with tempfile.TemporaryDirectory(prefix="bitpass-hessians-") as folder:
        path = Path(folder) / "model.onnx"
        work.save_external(path)
        del work, graph, values
        options = execution.session_options()
        options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            session = ort.InferenceSession(str(path), options, providers=execution.PROVIDERS)
        except Exception as err:  # ORT raises its own exception types
            raise BitpassError(f"ONNX Runtime cannot run the model to collect layer inputs: "
                               f"{execution.first_line(err)}") from err
        wanted = {i.name for i in session.get_inputs()}
        for feeds in data.batches(batch_size):
            got = dict(zip(fetch, session.run(fetch, {n: v for n, v in feeds.items() if n in wanted})))
            got.update({n: feeds[n] for n in names if n in inputs})
            yield got


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
