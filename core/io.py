"""Atomic writes (a file is either the old version or the complete new one, never half-written) and file digests."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's live process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``atomic_write`` temporaries below ``folder`` whose writer died (a kill -9 mid-write leaves
    one: a saved bank may be hundreds of MB); those of live processes are theirs to finish."""
    removed = []
    for tmp in Path(folder).rglob(f".*{TMP_SUFFIX}") if Path(folder).is_dir() else ():
        parts = tmp.name.removesuffix(TMP_SUFFIX).split(".")  # "", name parts..., pid, random
        pid = parts[-2] if len(parts) >= 4 else ""
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
