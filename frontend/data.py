"""Calibration and evaluation data: ``.npz`` files checked against the model's inputs.

One array per model input, keyed by the input's name, samples on the first
axis; an optional ``labels`` array enables classification accuracy. Files are
read with ``allow_pickle=False``: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitpass.frontend.errors import DataError
from bitpass.frontend.model import TensorSpec

LABELS = "labels"


@dataclass(frozen=True)
class Dataset:
    """Samples for every model input (same count), optional labels, and a content hash."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    sha256: str
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def head(self, count: int) -> Dataset:
        """The first ``count`` samples (all if fewer)."""
        inputs = {k: v[:count] for k, v in self.inputs.items()}
        labels = None if self.labels is None else self.labels[:count]
        return Dataset(inputs, labels, _digest(inputs, labels), f"{self.source}[:{count}]")


def _digest(inputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> str:
    h = hashlib.sha256()
    items = sorted(inputs.items()) + ([(LABELS, labels)] if labels is not None else [])
    for name, array in items:
        array = np.ascontiguousarray(array)
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def from_arrays(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], *, source: str = "<arrays>",
                role: str = "calibration") -> Dataset:
    """Validate arrays against the model inputs; cast to the inputs' dtypes."""
    arrays = dict(arrays)
    labels = arrays.pop(LABELS, None)
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in arrays]
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise DataError(f"{role} data {source}: {'; '.join(parts)} (model inputs: {', '.join(expected)})")
    inputs: dict[str, np.ndarray] = {}
    count = None
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        if array.dtype == object:
            raise DataError(f"{role} data {source}: {spec.name!r} holds Python objects; refused")
        if array.ndim == 0 or len(array) == 0:
            raise DataError(f"{role} data {source}: {spec.name!r} is empty: at least one sample is needed")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise DataError(f"{role} data {source}: {spec.name!r} has shape {array.shape}, "
                                f"the model expects {spec.describe()}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if axis > 0 and isinstance(want, int) and got != want:
                    raise DataError(f"{role} data {source}: {spec.name!r} has shape {array.shape}, "
                                    f"the model expects {spec.describe()}")
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise DataError(f"{role} data {source}: {spec.name!r} is {array.dtype}, the model expects {spec.dtype}")
        if count is not None and len(array) != count:
            raise DataError(f"{role} data {source}: inputs have different sample counts ({count} vs {len(array)})")
        count = len(array)
        inputs[spec.name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype == object or len(labels) != count:
            raise DataError(f"{role} data {source}: 'labels' must have one entry per sample ({count})")
    return Dataset(inputs, labels, _digest(inputs, labels), source)


def load_npz(path: str | Path, specs: Sequence[TensorSpec], *, role: str = "calibration") -> Dataset:
    """Read and validate an ``.npz`` file of samples for ``specs``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role} data {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{role} data {path}: not a readable .npz file (expected numpy.savez output)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as err:  # object arrays need pickle, which we refuse
        raise DataError(f"{role} data {path}: holds pickled objects; refused ({err})") from err
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"{role} data {path}: not a readable .npz file ({err})") from err
    if not arrays:
        raise DataError(f"{role} data {path}: the file holds no arrays")
    return from_arrays(arrays, specs, source=str(path), role=role)
