"""Artifact directories: written atomically, recognisable, checked file by file.

The promise: a compile either publishes a complete artifact or leaves nothing behind, and never
deletes or overwrites anything bitpass did not create. How it is kept:

* **One writer per destination.** ``Destination`` takes an exclusive hold on ``OUT`` for the whole
  compile: a hidden sibling work folder ``.OUT.bitpass-work`` made with an exclusive ``mkdir`` and
  kept ``flock``-ed. A second compile to the same ``OUT`` fails at once, naming the first one's pid;
  a work folder whose owner died (no lock held, our owner file inside) is ours and is cleared.
* **Staged, then published without replacing.** Files are written into a stage inside the work
  folder. Publishing re-checks the destination at that moment and renames the stage into place with
  ``renameat2(RENAME_NOREPLACE)``: a folder that appeared at ``OUT`` meanwhile is never replaced.
* **Only our own artifacts are replaced** (``--force``): the folder must be a real directory (not a
  symbolic link) holding a manifest whose sha256 matches ``manifest.sha256`` and no file other than
  those the manifest lists. It is moved aside, checked again after the move, and its listed files
  are deleted one by one; anything unexpected is moved back and the compile fails.
* **Verifiable.** ``manifest.sha256`` holds the manifest's digest and the manifest lists every other
  file with its sha256, so any edit, addition or removal is detected (``verify_files``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bitpass.frontend.errors import BitpassError, UsageError

MANIFEST = "manifest.json"
#: the manifest's sha256 in ``sha256sum`` format: the marker that bitpass wrote this folder
MANIFEST_DIGEST = "manifest.sha256"
MANIFEST_SCHEMA = 2
GENERATOR = "bitpass"
#: suffix of the hidden sibling folder that holds the stage and the lock while a compile runs
WORK_SUFFIX = ".bitpass-work"
_OWNER = "owner.json"
#: largest manifest read (a manifest is a few hundred kB even for big models)
MAX_MANIFEST_BYTES = 64 << 20


# --- hashing ----------------------------------------------------------------
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


# --- paths ------------------------------------------------------------------
def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute without resolving symbolic links (a link at ``-o`` must stay visible)."""
    text = os.fspath(path)
    if not text.strip():
        raise UsageError("the output path is empty: give -o DIR")
    if "\0" in text:
        raise UsageError("the output path contains a NUL character")
    return Path(os.path.abspath(text))


def safe_member(directory: Path, name: str) -> Path:
    """``directory / name`` for a file name recorded in a manifest: refused unless it stays inside."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise BitpassError(f"{directory}: the manifest lists {name!r}, which is not a plain file name inside the "
                           f"artifact; refusing to read it")
    path = directory / name
    root = directory.resolve()
    if not path.resolve().is_relative_to(root):
        raise BitpassError(f"{directory}: {name!r} leads outside the artifact (a symbolic link?); refusing to read it")
    return path


def _os_error(action: str, path: Path, err: OSError) -> BitpassError:
    reason = err.strerror or type(err).__name__
    hints = {errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions",
             errno.EROFS: "the file system is read-only", errno.ENOSPC: "free some disk space",
             errno.ENAMETOOLONG: "choose a shorter name", errno.ENOTDIR: "a parent of it is a file, not a folder"}
    hint = hints.get(err.errno or 0)
    return BitpassError(f"cannot {action} {path}: {reason}" + (f" ({hint})" if hint else ""))


# --- recognising our own artifacts ------------------------------------------
def manifest_digest(directory: Path) -> str | None:
    """The digest recorded in ``manifest.sha256`` (None when the file is missing or malformed)."""
    path = directory / MANIFEST_DIGEST
    try:
        text = path.read_text(encoding="ascii", errors="strict")[:200]
    except (OSError, UnicodeDecodeError):
        return None
    digest = text.split()[0] if text.split() else ""
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def listed_files(directory: Path) -> list[str] | None:
    """Files the manifest lists, or None when ``directory`` is not an intact bitpass artifact."""
    try:
        if directory.is_symlink() or not directory.is_dir():
            return None
        recorded = manifest_digest(directory)
        manifest_path = directory / MANIFEST
        if recorded is None or manifest_path.is_symlink() or not manifest_path.is_file():
            return None
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES or sha256_file(manifest_path) != recorded:
            return None
        manifest = json.loads(manifest_path.read_text())
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if manifest.get("generator") != GENERATOR or not isinstance(files, dict):
            return None
        return [safe_member(directory, name).name for name in files]
    except (OSError, ValueError, BitpassError):
        return None


def foreign_entries(directory: Path) -> list[str]:
    """Entries of an artifact folder that bitpass did not write (its listed files and manifest aside)."""
    listed = set(listed_files(directory) or ()) | {MANIFEST, MANIFEST_DIGEST}
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.name not in listed or entry.is_symlink() or not entry.is_file())


def is_own_artifact(directory: Path) -> bool:
    """A folder bitpass wrote and nobody added to: the only kind ``--force`` replaces."""
    return listed_files(directory) is not None and not foreign_entries(directory)


def check_destination(out_dir: Path, *, force: bool) -> None:
    """Refuse an output path that exists, unless ``force`` and it is an intact artifact bitpass wrote."""
    out_dir = absolute(out_dir)
    if out_dir == out_dir.parent:
        raise UsageError(f"{out_dir} cannot be an artifact folder: give -o a new folder's name")
    for parent in out_dir.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UsageError(f"cannot create {out_dir}: {parent} is a file, not a folder")
            break
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not force:
        raise UsageError(f"{out_dir} already exists: choose another -o, or pass --force to replace an earlier "
                         f"bitpass artifact")
    if out_dir.is_symlink():
        raise UsageError(f"{out_dir} is a symbolic link; refusing to replace it: give -o the real folder")
    if not out_dir.is_dir() or listed_files(out_dir) is None:
        raise UsageError(f"{out_dir} exists and is not an artifact bitpass wrote (no matching {MANIFEST_DIGEST}); "
                         f"refusing to replace it")
    extra = foreign_entries(out_dir)
    if extra:
        raise UsageError(f"{out_dir} holds files bitpass did not write ({', '.join(extra[:3])}"
                         f"{', ...' if len(extra) > 3 else ''}); refusing to replace it: move them out first")


# --- renaming without replacing ---------------------------------------------
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, failing with FileExistsError if ``target`` exists, atomically.

    ``os.rename`` would silently replace an empty directory at ``target``; Linux's
    ``renameat2(RENAME_NOREPLACE)`` refuses. Where it is missing the check-then-rename window remains.
    """
    function = _renameat2() if os.name == "posix" else None
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without RENAME_NOREPLACE
            raise OSError(code, os.strerror(code), str(target))
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


# --- one compile's hold on its destination ----------------------------------
class Destination:
    """Exclusive hold on an artifact destination for one compile; stage files, then ``publish``.

    Use as a context manager. On exit without a publish, everything bitpass created (the work folder
    and any parent folders it made) is removed; nothing else is touched.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, force: bool = False) -> None:
        self.out_dir = absolute(out_dir)
        self.force = force
        self.work = self.out_dir.with_name(f".{self.out_dir.name}{WORK_SUFFIX}")
        self.published = False
        self._lock_fd: int | None = None
        self._made_parents: list[Path] = []
        self._stages = 0

    def __enter__(self) -> Destination:
        check_destination(self.out_dir, force=self.force)
        self._make_parents()
        try:
            self._take_hold()
        except BaseException:
            self._remove_made_parents()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_parents(self) -> None:
        missing = [p for p in self.out_dir.parents if not p.exists()][::-1]
        for parent in missing:
            try:
                parent.mkdir()
            except FileExistsError:
                continue
            except OSError as err:
                self._remove_made_parents()
                raise _os_error("create the folder", parent, err) from err
            self._made_parents.append(parent)

    def _take_hold(self) -> None:
        for _attempt in range(3):
            try:
                self.work.mkdir()
            except FileExistsError:
                self._clear_stale_work()
                continue
            except OSError as err:
                raise _os_error("create the artifact in", self.out_dir.parent, err) from err
            try:
                self._lock_fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                (self.work / _OWNER).write_text(json.dumps({"pid": os.getpid(), "started": time.time(),
                                                            "output": str(self.out_dir)}))
            except OSError as err:
                self.close()
                raise _os_error("create the artifact in", self.out_dir.parent, err) from err
            return
        raise BitpassError(f"cannot take hold of {self.out_dir}: {self.work} keeps reappearing")

    def _clear_stale_work(self) -> None:
        """A work folder exists: another live compile's (refuse), a dead one's (clear), or not ours (refuse)."""
        owner = self.work / _OWNER
        if self.work.is_symlink() or not self.work.is_dir() or not owner.is_file():
            raise BitpassError(f"{self.work} exists and was not made by bitpass; refusing to touch it: move it away")
        try:
            fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise _os_error("open", self.work, err) from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _owner_pid(owner)
                raise BitpassError(f"another bitpass (pid {pid}) is writing {self.out_dir}: wait for it to "
                                   f"finish, or choose another -o") from None
            shutil.rmtree(self.work)  # its owner died mid-compile; everything in it is ours
        finally:
            os.close(fd)

    def stage(self) -> Path:
        """A fresh, empty folder to write an artifact into (several per compile are allowed)."""
        if self._lock_fd is None:
            raise BitpassError("Destination.stage() outside its `with` block")
        self._stages += 1
        path = self.work / f"stage-{self._stages}"
        path.mkdir()
        return path

    def discard(self, stage: Path) -> None:
        """Remove a stage that will not be published."""
        if stage.parent == self.work:
            shutil.rmtree(stage, ignore_errors=True)

    def publish(self, stage: Path) -> Path:
        """Move a finished ``stage`` to the destination; never replaces anything bitpass did not write."""
        if stage.parent != self.work:
            raise BitpassError(f"{stage} is not a stage of {self.out_dir}")
        out = self.out_dir
        _pause_for_tests()
        try:
            if out.exists() or out.is_symlink():
                self._set_aside_old()
            try:
                rename_no_replace(stage, out)
            except FileExistsError:
                raise BitpassError(f"{out} appeared while bitpass was compiling; it was left as it is and the new "
                                   f"artifact was not written: choose another -o") from None
        except OSError as err:
            raise _os_error("publish the artifact to", out, err) from err
        self.published = True
        self._delete_old()
        return out

    def _set_aside_old(self) -> None:
        """``--force``: move an earlier artifact of ours into the work folder, checking it before and after."""
        out, old = self.out_dir, self.work / "old"
        if not self.force:
            raise BitpassError(f"{out} appeared while bitpass was compiling; it was left as it is and the new "
                               f"artifact was not written: choose another -o")
        check_destination(out, force=True)  # again, at the moment of replacing
        rename_no_replace(out, old)
        if not is_own_artifact(old):  # swapped between the check and the move: put it back untouched
            try:
                rename_no_replace(old, out)
            except OSError:
                raise BitpassError(f"{out} changed while being replaced; it is kept at {old}") from None
            raise BitpassError(f"{out} changed while being replaced; it was left as it is")

    def _delete_old(self) -> None:
        old = self.work / "old"
        if not old.exists():
            return
        for name in [*(listed_files(old) or []), MANIFEST, MANIFEST_DIGEST]:
            with contextlib.suppress(FileNotFoundError):
                (old / name).unlink()
        with contextlib.suppress(OSError):
            old.rmdir()  # anything left was not ours: close() keeps the work folder then

    def close(self) -> None:
        """Release the hold: remove the work folder (all ours) and, unless published, parents we made."""
        if self._lock_fd is None:
            return
        old = self.work / "old"
        if old.exists():  # not ours after all (close() refuses to delete it): leave it beside the output
            rescue = self.out_dir.with_name(f"{self.out_dir.name}.previous")
            with contextlib.suppress(OSError):
                rename_no_replace(old, rescue)
        if not old.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None
        if not self.published:
            self._remove_made_parents()

    def _remove_made_parents(self) -> None:
        for parent in reversed(self._made_parents):
            with contextlib.suppress(OSError):
                parent.rmdir()
        self._made_parents = []


def _pause_for_tests() -> None:
    """``BITPASS_TEST_PAUSE_BEFORE_PUBLISH=1`` stops the process (SIGSTOP) with the stage complete, just before the
    destination is re-checked and the stage renamed: the race tests then create a folder at ``-o``, start a
    second compile or send a signal, and continue it (SIGCONT). Read here, at that moment, and nowhere else."""
    if os.environ.get("BITPASS_TEST_PAUSE_BEFORE_PUBLISH") == "1":
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)


def _owner_pid(owner: Path) -> str:
    try:
        return str(json.loads(owner.read_text()).get("pid", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


@contextlib.contextmanager
def staging(out_dir: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a stage; on success it atomically becomes ``out_dir``, on failure everything vanishes."""
    with Destination(out_dir, force=force) as destination:
        stage = destination.stage()
        yield stage
        destination.publish(stage)


# --- the manifest -----------------------------------------------------------
def file_table(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in sorted(names)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` and its digest file (the marker that makes the folder recognisably ours)."""
    manifest["generator"] = GENERATOR
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    (directory / MANIFEST_DIGEST).write_text(f"{digest}  {MANIFEST}\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise UsageError(f"{directory} is not an artifact folder")
    if not path.is_file():
        raise UsageError(f"{directory} is not a bitpass artifact (no {MANIFEST})")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BitpassError(f"{path}: manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a bitpass manifest")
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, ints past 4300 digits
        raise BitpassError(f"{path}: manifest is not valid JSON ({str(err)[:120]})") from err
    except OSError as err:
        raise _os_error("read", path, err) from err
    if not isinstance(manifest, dict):
        raise BitpassError(f"{path}: manifest is not a JSON object")
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise BitpassError(f"{path}: manifest schema {str(manifest.get('schema'))[:20]!r} is not {MANIFEST_SCHEMA}: "
                           f"recompile the artifact with this bitpass")
    for key, kind in (("files", dict), ("layers", list), ("inputs", list), ("outputs", list),
                      ("backend", str), ("target", str)):
        if not isinstance(manifest.get(key), kind):
            raise BitpassError(f"{path}: manifest field {key!r} is missing or malformed")
    for name, info in manifest["files"].items():
        safe_member(directory, name)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise BitpassError(f"{path}: manifest entry for {name!r} is malformed")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Every way the folder differs from what was compiled: an edited manifest, a file missing, changed,
    or added. Reads only inside ``directory``."""
    directory = Path(directory)
    problems = []
    recorded = manifest_digest(directory)
    if recorded is None:
        problems.append(f"{MANIFEST_DIGEST} is missing or malformed")
    elif sha256_file(directory / MANIFEST) != recorded:
        problems.append(f"{MANIFEST} was edited after compiling (its sha256 differs from {MANIFEST_DIGEST})")
    files = manifest.get("files", {})
    for name, info in files.items():
        path = safe_member(directory, name)
        if path.is_symlink() or not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != info["sha256"]:
            problems.append(f"{name} changed since it was compiled (sha256 differs)")
    for entry in sorted(directory.iterdir()):
        if entry.name not in files and entry.name not in (MANIFEST, MANIFEST_DIGEST):
            problems.append(f"{entry.name} is not part of the artifact (not listed in {MANIFEST})")
    return problems
