"""Calibration and evaluation data: ``.npz`` files checked against the model's inputs.

One array per model input, keyed by the input's name, samples on the first
axis; an optional ``labels`` array (one class index per sample) enables
classification accuracy. A model with an input named ``labels`` takes that
array as its input; its class labels then go under ``bitpass_labels``.

Files are read member by member with ``allow_pickle=False`` (object arrays are
refused, never unpickled), and nothing is inflated before its size is known:
every ``.npy`` header is read first, must agree with the bytes its member
holds, and the total must stay under ``BITPASS_MAX_DATA_BYTES`` (default
512 MiB); calibration and evaluation sets hold at most ``BITPASS_MAX_SAMPLES``
samples (default 100,000). Calibration and evaluation data must be finite.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitpass.frontend.errors import DataError
from bitpass.frontend.model import TensorSpec

LABELS = "labels"
#: where class labels go when a model input is itself named ``labels``
ALT_LABELS = "bitpass_labels"

#: environment variables raising the caps, and their defaults
MAX_BYTES_ENV, DEFAULT_MAX_BYTES = "BITPASS_MAX_DATA_BYTES", 512 << 20
MAX_SAMPLES_ENV, DEFAULT_MAX_SAMPLES = "BITPASS_MAX_SAMPLES", 100_000
#: roles whose samples are capped and must be finite (``input``, for ``bitpass run``, is the user's batch)
DATASET_ROLES = ("calibration", "evaluation")
#: members in one .npz, and bytes of one .npy header, at most
MAX_MEMBERS = 1024
MAX_HEADER_BYTES = 10_000

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


@dataclass(frozen=True)
class Dataset:
    """Samples for every model input (same count), optional labels, and a content hash.

    ``fixed_batch``: the batch size the model's inputs are fixed at (None when the first axis is
    dynamic); ``batches`` then always yields batches of that size, whatever size is asked for.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    sha256: str
    source: str
    fixed_batch: int | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch_size(self, wanted: int) -> int:
        """The batch size to use when ``wanted`` is asked for: the model's fixed batch if it has one."""
        return self.fixed_batch or max(1, wanted)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        size = self.batch_size(batch_size)
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    def batch_of(self, size: int) -> dict[str, np.ndarray]:
        """One feed of exactly ``size`` samples (the samples repeated when there are fewer), contiguous:
        what timing a model at batch ``size`` runs on."""
        out = {}
        for name, array in self.inputs.items():
            reps = -(-size // len(array))
            out[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:size])
        return out

    def head(self, count: int) -> Dataset:
        """The first ``count`` samples (all if fewer; a whole number of batches for a fixed-batch model)."""
        if self.fixed_batch:
            count = max(self.fixed_batch, count - count % self.fixed_batch)
        return self.take(0, count)

    def take(self, start: int, stop: int | None = None) -> Dataset:
        """Samples ``start:stop``, with their own digest (a held-back part of a calibration set, say)."""
        inputs = {k: v[start:stop] for k, v in self.inputs.items()}
        labels = None if self.labels is None else self.labels[start:stop]
        where = f"{start if start else ''}:{'' if stop is None else stop}"
        return Dataset(inputs, labels, _digest(inputs, labels), f"{self.source}[{where}]", self.fixed_batch)


def _digest(inputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> str:
    h = hashlib.sha256()
    items = sorted(inputs.items()) + ([(LABELS, labels)] if labels is not None else [])
    for name, array in items:
        array = np.ascontiguousarray(array)
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


_PLAIN = re.compile(r"[\w.:/-]+")


def _show(name: object, limit: int = 60) -> str:
    """A name as it may appear in a one-line message: as is when plain, else quoted and escaped; shortened."""
    text = str(name)
    if not _PLAIN.fullmatch(text):
        text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _human(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _env_limit(name: str, default: int) -> int:
    """A cap from the environment (``800M``, ``2G``, ``250000``), or its default."""
    text = os.environ.get(name, "").strip().upper().replace("_", "")
    if not text:
        return default
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise DataError(f"{name}={os.environ[name][:40]!r} is not a size (examples: 250000, 800M, 2G)") from None
    if value <= 0:
        raise DataError(f"{name} must be positive")
    return value


def max_bytes() -> int:
    return _env_limit(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)


def max_samples() -> int:
    return _env_limit(MAX_SAMPLES_ENV, DEFAULT_MAX_SAMPLES)


def _fixed_batch(specs: Sequence[TensorSpec]) -> int | None:
    """The batch size every input is fixed at, if the first axis of each is a number (and they agree)."""
    batches = {s.shape[0] for s in specs if s.shape}
    if len(batches) == 1:
        (batch,) = batches
        if isinstance(batch, int) and batch > 0:
            return batch
    return None


def _check_labels(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == object or labels.ndim == 0 or len(labels) != count:
        raise DataError(f"{where}: 'labels' must have one entry per sample ({count})")
    if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(f"{where}: 'labels' has shape {labels.shape}: give one class index per sample, shape "
                        f"({count},) (for one-hot labels, use labels.argmax(1))")
    labels = labels.reshape(count)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    elif labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{where}: 'labels' holds fractional or non-finite values: give integer class indices")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{where}: 'labels' is {labels.dtype}: give integer class indices")
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: 'labels' holds negative values (smallest {int(labels.min())}): "
                        f"give class indices 0..classes-1")
    return labels


def _check_finite(name: str, array: np.ndarray, where: str) -> None:
    if array.dtype.kind not in "fc":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.isnan(array).sum())
    inf = int(array.size - finite.sum()) - nan
    parts = [f"{nan:,} NaN" if nan else "", f"{inf:,} infinite" if inf else ""]
    raise DataError(f"{where}: {_show(name)} holds {' and '.join(p for p in parts if p)} values (of {array.size:,}); "
                    f"replace or drop those samples")


def from_arrays(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], *, source: str = "<arrays>",
                role: str = "calibration") -> Dataset:
    """Validate arrays against the model inputs; cast to the inputs' dtypes."""
    where = f"{role} data {source}"
    arrays = dict(arrays)
    expected = [s.name for s in specs]
    labels = arrays.pop(ALT_LABELS, None)
    if LABELS not in expected:
        found = arrays.pop(LABELS, None)
        if labels is not None and found is not None:
            raise DataError(f"{where}: both {LABELS!r} and {ALT_LABELS!r} are given: keep one")
        labels = found if labels is None else labels
    missing = [n for n in expected if n not in arrays]
    extra = sorted(set(arrays) - set(expected), key=str)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(_show(n, 40) for n in missing[:5])}")
        if extra:
            parts.append(f"unexpected {', '.join(_show(n, 40) for n in extra[:5])}")
        more = len(missing) + len(extra) > 10
        inputs = ", ".join(_show(n, 40) for n in expected[:8]) + (", ..." if len(expected) > 8 or more else "")
        raise DataError(f"{where}: {'; '.join(parts)} (model inputs: {inputs})")
    fixed = _fixed_batch(specs)
    inputs: dict[str, np.ndarray] = {}
    count = None
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        name = _show(spec.name)
        if array.dtype == object:
            raise DataError(f"{where}: {name} holds Python objects; refused")
        if array.ndim == 0 or len(array) == 0:
            raise DataError(f"{where}: {name} is empty: at least one sample is needed")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise DataError(f"{where}: {name} has shape {array.shape}, the model expects {spec.describe()[:80]}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if axis > 0 and isinstance(want, int) and got != want:
                    raise DataError(f"{where}: {name} has shape {array.shape}, "
                                    f"the model expects {spec.describe()[:80]}")
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise DataError(f"{where}: {name} is {array.dtype}, the model expects {spec.dtype}")
        if count is not None and len(array) != count:
            raise DataError(f"{where}: inputs have different sample counts ({count} vs {len(array)})")
        count = len(array)
        if role in DATASET_ROLES:
            _check_finite(spec.name, array, where)
        inputs[spec.name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    if count is None:
        raise DataError(f"{where}: the model has no inputs to feed")
    if role in DATASET_ROLES and count > max_samples():
        raise DataError(f"{where}: {count:,} samples, over the cap of {max_samples():,} ({MAX_SAMPLES_ENV}); "
                        f"use a subset, or raise the cap with {MAX_SAMPLES_ENV}=N")
    if fixed and count % fixed:
        raise DataError(f"{where}: {count} samples, but the model's batch is fixed at {fixed}: "
                        f"give a multiple of {fixed} samples")
    if labels is not None:
        labels = _check_labels(labels, count, where)
    return Dataset(inputs, labels, _digest(inputs, labels), source, fixed)


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a member's .npy header, checked against the bytes the member holds."""
    member = _show(info.filename)
    with archive.open(info) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle, max_header_size=MAX_HEADER_BYTES)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle, max_header_size=MAX_HEADER_BYTES)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except (ValueError, SyntaxError, TypeError, EOFError, OverflowError) as err:
            detail = str(err).strip().splitlines()[0][:80] if str(err).strip() else type(err).__name__
            raise DataError(f"{where}: member {member} has a corrupt .npy header ({detail})") from None
        header = handle.tell()
    if dtype.hasobject:
        raise DataError(f"{where}: member {member} holds pickled Python objects; refused, never unpickled "
                        f"(save numeric arrays)")
    count = 1
    for dim in shape:
        count *= int(dim)
    if count * dtype.itemsize != info.file_size - header:
        raise DataError(f"{where}: member {member} declares shape {tuple(shape)[:6]} of {dtype} "
                        f"({_human(count * dtype.itemsize)}) but holds {_human(max(info.file_size - header, 0))}: "
                        f"the file is corrupt")
    return tuple(shape), dtype


def read_npz(path: str | Path, *, role: str = "calibration") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, each checked before it is inflated (see the module docstring)."""
    path = Path(path)
    where = f"{role} data {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    cap = max_bytes()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise DataError(f"{where}: not a readable .npz file (expected numpy.savez output)") from None
    with archive:
        infos = archive.infolist()
        if not infos:
            raise DataError(f"{where}: the file holds no arrays")
        if len(infos) > MAX_MEMBERS:
            raise DataError(f"{where}: {len(infos):,} members, more than the {MAX_MEMBERS} bitpass reads")
        declared = sum(info.file_size for info in infos)
        if declared > cap:
            raise DataError(f"{where}: inflates to {_human(declared)}, over the cap of {_human(cap)} "
                            f"({MAX_BYTES_ENV}); raise it with {MAX_BYTES_ENV}=2G if the data is genuine")
        arrays: dict[str, np.ndarray] = {}
        for info in infos:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise DataError(f"{where}: member {_show(info.filename)} is not a .npy array "
                                f"(expected numpy.savez output)")
            key = info.filename[: -len(".npy")]
            if key in arrays:
                raise DataError(f"{where}: array {_show(key)} appears twice; the file is corrupt")
            try:
                shape, _ = _member_header(archive, info, where)
                if role in DATASET_ROLES and shape and shape[0] > max_samples():
                    raise DataError(f"{where}: {_show(key)} holds {shape[0]:,} samples, over the cap of "
                                    f"{max_samples():,} ({MAX_SAMPLES_ENV}); use a subset, or raise the cap with "
                                    f"{MAX_SAMPLES_ENV}=N")
                with archive.open(info) as handle:
                    arrays[key] = np.lib.format.read_array(handle, allow_pickle=False,
                                                           max_header_size=MAX_HEADER_BYTES)
            except DataError:
                raise
            except MemoryError:
                raise DataError(f"{where}: not enough memory to load {_show(key)} "
                                f"({_human(info.file_size)})") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
                    NotImplementedError) as err:
                detail = str(err).strip().splitlines()[0][:80] if str(err).strip() else type(err).__name__
                raise DataError(f"{where}: member {_show(info.filename)} is corrupt or unreadable ({detail})") \
                    from None
    return arrays


def load_npz(path: str | Path, specs: Sequence[TensorSpec], *, role: str = "calibration") -> Dataset:
    """Read and validate an ``.npz`` file of samples for ``specs``."""
    return from_arrays(read_npz(path, role=role), specs, source=str(path), role=role)
