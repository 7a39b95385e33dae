"""Atomic writes (a file is either the old version or the complete new one, never half-written) and file digests."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


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
OLD_SUFFIX = ".old"  # write_sealed_folder's earlier folder, moved aside until the new one is in place


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
    with ``prefix``) whose writer died: ``atomic_write`` files and ``core.model_files.write_sealed_folder``
    folders (``.<name>.<pid>.<random>.tmp``: a kill -9 mid-write leaves one, a saved bank may be hundreds of MB)
    and the earlier folder it was replacing (``.<name>.<pid>.old``). Those of live processes are theirs to finish."""
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
    """The PID in a temporary's name: ``.<name>.<pid>.<random>.tmp`` or ``.<name>.<pid>.old``; None if none."""
    tmp = name.endswith(TMP_SUFFIX)
    parts = name.removesuffix(TMP_SUFFIX if tmp else OLD_SUFFIX).split(".")  # "", name parts..., pid[, random]
    pid = parts[-2] if tmp and len(parts) >= 4 else parts[-1] if not tmp and len(parts) >= 3 else ""
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
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
