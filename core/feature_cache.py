"""Feature cache: the training patch features of a category, kept on disk between runs.

Re-fitting a category with another coreset (ratio, sampler, seed) or another search backend
reads the features back instead of running the backbone again. The key covers everything
that determines the features: the extractor's spec (and the size/mtime of any weights file
it names), the embedder's spec, the preprocessing, the buffer dtype and every training
image's path, size and modification time; any change gives a new entry. Entries are the
raw feature file that ``fit`` streamed into (``<key>.bin`` + ``<key>.bin.json``, see
``core.memory.DiskFeatures``), renamed into place only once complete; delete the folder to
clear the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from core.memory import DiskFeatures, FeatureBuffer

CACHE_VERSION = 1


def _file_identity(value) -> list | None:
    """(size, mtime) of an existing file named by a spec value, so replaced weights change the key."""
    if isinstance(value, str) and value and os.path.isfile(os.path.expanduser(value)):
        stat = os.stat(os.path.expanduser(value))
        return [stat.st_size, stat.st_mtime_ns]
    return None


def dataset_fingerprint(dataset) -> list | None:
    """Paths, sizes and mtimes of a dataset's images (``samples`` with ``path``), with its preprocessing."""
    samples = getattr(dataset, "samples", None)
    preprocessing = getattr(dataset, "preprocessing", None)
    if samples is None or preprocessing is None:
        return None
    files = []
    for sample in samples:
        path = getattr(sample, "path", None)
        if path is None:
            return None
        stat = os.stat(path)
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    return [repr(preprocessing), files]


class FeatureCache:
    """Feature files in ``directory``, one per (extractor, embedder, dataset, dtype)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def key(self, extractor_spec: dict, embedder_spec: dict, dataset, dtype: str) -> str | None:
        """The entry name, or None when the dataset cannot be fingerprinted (then nothing is cached)."""
        fingerprint = dataset_fingerprint(dataset)
        if fingerprint is None:
            return None
        weights = {name: _file_identity(value) for name, value in extractor_spec.get("kwargs", {}).items()}
        record = [CACHE_VERSION, extractor_spec, weights, embedder_spec, dtype, fingerprint]
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.bin"

    def lookup(self, key: str) -> tuple[DiskFeatures, dict] | None:
        path = self._path(key)
        meta_path = Path(f"{path}.json")
        if not path.is_file() or not meta_path.is_file():
            return None
        try:
            features = DiskFeatures(path)
        except (ValueError, KeyError, json.JSONDecodeError):  # incomplete or foreign: recompute
            return None
        return features, json.loads(meta_path.read_text())

    def writer(self, key: str, rows: int, dim: int, dtype) -> FeatureBuffer:
        """A buffer on disk next to the entry; ``commit`` moves it into place."""
        temporary = self.directory / f".{key}.{os.getpid()}.tmp"
        return FeatureBuffer(rows, dim, dtype, path=temporary)

    def commit(self, buffer: FeatureBuffer, key: str, extra: dict) -> DiskFeatures:
        """Finish ``buffer``, record ``extra`` (grid, input size) with it and rename it into place."""
        buffer.view()  # closes the file and writes its metadata
        meta_tmp = Path(f"{buffer.path}.json")
        meta = {**json.loads(meta_tmp.read_text()), **extra}
        meta_tmp.write_text(json.dumps(meta))
        final = self._path(key)
        os.replace(buffer.path, final)
        os.replace(meta_tmp, f"{final}.json")  # last: an entry counts only with its metadata
        return DiskFeatures(final)
