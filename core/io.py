"""Atomic writes (a file is either the old version or the complete new one, never half-written; a folder of
outputs is swapped in whole, ``replace_folder``) and file digests."""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file in the target folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in the name, so a temporary left by a killed process can be told from a live one's
    # (``remove_dead_temporaries``).
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; results should read like any file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"  # replace_folder's earlier folder, moved aside until the new one is in place


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's live process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(folder: str | Path, prefix: str = ".", recursive: bool = True) -> list[Path]:
    """Delete the temporaries below ``folder`` (only its own entries without ``recursive``; only names starting
    with ``prefix``) whose writer died: ``atomic_write`` files and ``replace_folder`` folders
    (``.<name>.<pid>.<random>.tmp``: a kill -9 mid-write leaves one, a saved bank may be hundreds of MB) and the
    earlier folder it was replacing (``.<name>.<pid>.<random>.old``). Those of live processes are theirs to finish."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for suffix in (TMP_SUFFIX, OLD_SUFFIX)
             for path in (folder.rglob(f".*{suffix}") if recursive else folder.glob(f".*{suffix}"))]
    removed = []
    for path in sorted(found):  # a folder before what is inside it
        if not path.name.startswith(prefix) or not os.path.lexists(path):
            continue
        pid = _writer_pid(path.name)
        if pid is not None and not process_alive(pid):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _writer_pid(name: str) -> int | None:
    """The PID in a temporary's name, ``.<name>.<pid>.<random>.tmp`` or ``.<name>.<pid>.<random>.old``; None
    if it has none."""
    parts = name.removesuffix(TMP_SUFFIX if name.endswith(TMP_SUFFIX) else OLD_SUFFIX).split(".")
    pid = parts[-2] if len(parts) >= 4 else ""  # "", name parts..., pid, random
    return int(pid) if pid.isdigit() else None


def current_umask() -> int:
    """The process's umask (reading it means setting it: set straight back)."""
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (weights files are hundreds of MB)."""
    with Path(path).open("rb") as handle:
        return stream_sha256(handle)


def stream_sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def replace_folder(directory: str | Path, write: Callable[[Path], None],
                   keep: Callable[[str], bool] = lambda name: False) -> Path:
    """Call ``write(tmp)`` on a new temporary sibling of ``directory``; once it returns, move the entries of
    the earlier ``directory`` that ``keep(name)`` accepts (a log file another writer still holds open) into
    it and swap it into place. The earlier folder is replaced only when the new one is complete: if ``write``
    raises, it is untouched and the temporary is removed. The caller checks first what it may replace.
    Temporaries of writers that were killed (``.<name>.<pid>.*.tmp`` / ``.old``) are removed first."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_folder_temporaries(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=directory.parent))
    old = directory.parent / f"{tmp.name.removesuffix(TMP_SUFFIX)}{OLD_SUFFIX}"
    try:
        write(tmp)
        earlier = directory.is_dir()
        os.chmod(tmp, (directory.stat().st_mode & 0o7777) if earlier else 0o777 & ~current_umask())
        if earlier:
            for entry in directory.iterdir():
                if keep(entry.name):
                    os.replace(entry, tmp / entry.name)
            os.replace(directory, old)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory


def remove_dead_folder_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary siblings ``replace_folder`` left for ``directory`` when its writer was killed; an
    earlier folder caught mid-swap (``directory`` gone, its ``.old`` left) is put back first."""
    directory = Path(directory)
    restored = []
    if not os.path.lexists(directory):
        for old in sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*{OLD_SUFFIX}")):
            pid = _writer_pid(old.name)
            if old.is_dir() and not old.is_symlink() and pid is not None and not process_alive(pid):
                os.replace(old, directory)
                restored.append(old)
                break
    return restored + remove_dead_temporaries(directory.parent, prefix=f".{directory.name}.", recursive=False)


class NotRegularFileError(OSError):
    """A path that should be a plain file is a link, a FIFO, a device or a folder; the message says which."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, size: int | None = None, limit: int | None = None) -> BinaryIO:
    """``path`` opened for reading only if it is itself a regular file (not a symbolic link, even to a file;
    not a FIFO, device or folder), of ``size`` bytes when given and at most ``limit`` bytes: a file read off a
    hostile folder cannot block the reader (a FIFO), never ends (``/dev/zero``) or lie outside the folder (a
    link). Checked with ``lstat`` before opening (a device is never opened) and again with ``fstat`` on the
    opened file (no window between check and read). ``NotRegularFileError`` or ``FileSizeError`` otherwise."""
    path = Path(path)
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"{path} is {_kind(mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise NotRegularFileError(f"{path} is a symbolic link, not a regular file") from None
        raise
    handle = os.fdopen(fd, "rb")
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise NotRegularFileError(f"{path} is {_kind(found.st_mode)}, not a regular file")
        if size is not None and found.st_size != size:
            raise FileSizeError(f"{path} has {found.st_size} bytes, not the {size} recorded")
        if limit is not None and found.st_size > limit:
            raise FileSizeError(f"{path} has {found.st_size} bytes, more than the {limit} a file of its kind may have")
    except BaseException:
        handle.close()
        raise
    return handle


class FileSizeError(OSError):
    """A file whose size is not the one recorded, or larger than its kind may be."""


# model.json, export.json, manifest.json: a few kB (a CAE's loss log adds ~20 bytes a step); a larger one is
# refused before it is read.
MAX_RECORD_BYTES = 64 << 20


def read_record_text(path: str | Path) -> str:
    """The text of a small record file (JSON) read off a folder that may be hostile: ``open_regular``, at most
    ``MAX_RECORD_BYTES``."""
    with open_regular(path, limit=MAX_RECORD_BYTES) as handle:
        return handle.read().decode("utf-8")
