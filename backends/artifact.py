"""Artifact directories: written atomically, described by ``manifest.json``, checked by hash.

An artifact is never half-written: everything goes into a temporary sibling
directory which is renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bitpass.frontend.errors import BitpassError, UsageError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deflated_size(source: Path | bytes, chunk: int = 1 << 22) -> int:
    """Bytes of a file (or of ``bytes``) deflated at level 9, as a zip of the artifact stores them: where
    zeros that leave the tensors dense (unstructured sparsity) show as saved bytes. Streamed."""
    import io
    import zlib

    packer, total = zlib.compressobj(9), 0
    with (io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")) as handle:
        while block := handle.read(chunk):
            total += len(packer.compress(block))
    return total + len(packer.flush())


def check_destination(out_dir: Path, *, force: bool) -> None:
    """Refuse to overwrite an existing path unless ``force`` and it is an earlier artifact."""
    if not out_dir.exists():
        if not out_dir.parent.exists():
            raise UsageError(f"output folder {out_dir.parent} does not exist")
        return
    if not force:
        raise UsageError(f"{out_dir} already exists: choose another -o, or pass --force to replace it")
    if not (out_dir / MANIFEST).is_file():
        raise UsageError(f"{out_dir} exists and is not a bitpass artifact; refusing to replace it")


@contextlib.contextmanager
def staging(out_dir: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it atomically becomes ``out_dir``, on failure it vanishes."""
    out_dir = Path(out_dir)
    check_destination(out_dir, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():  # force: swap the old artifact out, the new one in, then delete the old
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_table(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in sorted(names)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{directory} is not a bitpass artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BitpassError(f"{path}: manifest is not valid JSON ({err})") from err
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise BitpassError(f"{path}: manifest schema {manifest.get('schema')!r} is not {MANIFEST_SCHEMA}")
    return manifest


def check_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Files that are missing or differ from the hashes recorded at compile time."""
    problems = []
    for name, info in manifest.get("files", {}).items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != info["sha256"]:
            problems.append(f"{name} changed since it was compiled (sha256 differs)")
    return problems
