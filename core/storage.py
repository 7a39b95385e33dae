"""Fit-time storage of the training patch features: in memory, spilled to a file, or from the cache.

``FeatureStore.gather`` streams the embedded training batches into one preallocated buffer
(float32 or float16; a tensor on the compute device, or a file under ``spill_dir`` when it
would exceed ``spill_above_gb``) and returns it as ``TrainingFeatures``, which the samplers read
in row slices. With ``cache_dir``, the buffer is written straight into the feature cache, and a
later fit with the same inputs reads it back without running the backbone (the batches are not
even iterated). On an error or an interrupt nothing half-written is left behind.

Files are ``.npy`` (numpy's own header: ``np.load(path, mmap_mode="r")`` opens them), written
sequentially and read back in chunks at an offset rather than memory-mapped: mapped pages count
in the process's resident memory once touched, which is what spilling avoids (docs/performance.md).
The header is written first for zero rows and rewritten in place once the row count is known
(numpy leaves room for the row count to grow).

The cache key covers everything that determines the features: the extractor's spec (and the
size/mtime of any file a spec value names, so replaced weights change the key), the embedder's
spec, the preprocessing, the buffer dtype and every training image's path, size and mtime. An
entry is ``<key>.npy`` plus ``<key>.json`` (grid and input size), the JSON written last: an entry
counts only with it. Delete the folder to clear the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.feature_files import FeatureFile, FileWriter, MemoryWriter
from core.io import process_alive, write_json_atomic

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
CACHE_VERSION = 2  # 2: .npy entries (1: raw file + JSON sidecar)


@dataclass
class StorageOptions:
    """The ``storage`` config node: how ``fit`` buffers the training features (not saved with the model)."""

    dtype: str = "float32"  # training-feature buffer: float32 | float16 (half the memory)
    spill_dir: str | None = None  # buffer the training features in a file here instead of in memory
    spill_above_gb: float = 0.0  # ... but only when the buffer would be larger than this
    cache_dir: str | None = None  # feature cache: refits with another coreset reuse the features
    memory_budget_gb: float | None = None  # a buffer larger than this spills to a file; None: the available memory

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"storage.dtype={self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.spill_above_gb < 0:
            raise ValueError(f"storage.spill_above_gb={self.spill_above_gb} must be >= 0")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"storage.memory_budget_gb={self.memory_budget_gb} must be > 0, or null for the "
                             "available memory")


@dataclass
class EmbeddedBatch:
    features: torch.Tensor  # [B, P, D] patch features
    grid: tuple[int, int]  # (h, w), h * w = P
    input_size: tuple[int, int]  # (H, W) of the images


class TrainingFeatures:
    """The gathered ``[rows, dim]`` training features, in memory or in a file: what the samplers read
    (``core.coreset.FeatureRows``). ``device``: where the samplers compute; ``info``: how they were stored."""

    def __init__(self, rows: torch.Tensor | FeatureFile, grid: tuple[int, int], input_size: tuple[int, int],
                 device: torch.device, cached: bool = False, temporary: bool = False) -> None:
        self._rows, self.grid, self.input_size = rows, tuple(grid), tuple(input_size)
        self.device = rows.device if isinstance(rows, torch.Tensor) else torch.device(device)
        self._temporary = temporary  # a spill file, deleted by release()
        self.info = {"cached": cached, "spilled": isinstance(rows, FeatureFile),
                     "buffer_bytes": len(rows) * self.shape[1] * rows.dtype.itemsize}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def shape(self) -> tuple[int, int]:
        rows = self._rows
        return tuple(rows.shape) if isinstance(rows, torch.Tensor) else (rows.rows, rows.dim)

    def __getitem__(self, item: slice) -> torch.Tensor:
        if isinstance(self._rows, torch.Tensor):
            return self._rows[item]
        if not isinstance(item, slice) or item.step not in (None, 1):
            return self.take(torch.as_tensor(item))
        start, stop, _ = item.indices(self._rows.rows)
        return self._rows.read(start, max(start, stop))

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (any order), on this storage's device (the CPU for a file)."""
        if isinstance(self._rows, torch.Tensor):
            return self._rows[torch.as_tensor(indices).to(self._rows.device)]
        return self._rows.take(indices)

    def release(self) -> None:
        """Drop the features: a spill file is deleted, a cache entry kept."""
        if self._temporary and isinstance(self._rows, FeatureFile):
            self._rows.path.unlink(missing_ok=True)
        self._rows = None

    def __enter__(self) -> TrainingFeatures:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()  # also when the sampler fails or is interrupted: no spill file left behind


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

    def usable(self) -> bool:
        """Whether entries can be written here; when not, a warning says so and the caller caches nothing."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".write-test-"):
                pass
        except OSError as error:
            log.warning("storage.cache_dir=%s cannot be written (%s): fitting without the feature cache",
                        self.directory, error.strerror or error)
            return False
        return True

    def remove_orphans(self) -> list[Path]:
        """Delete the temporaries (``.<key>.<pid>.tmp.npy``) of writers whose process died (a kill -9
        mid-extraction leaves one, possibly of many MB); those of live processes are theirs to finish."""
        removed = []
        for path in self.directory.glob(".*.tmp.npy"):
            pid = path.name.removesuffix(".tmp.npy").rpartition(".")[2]
            if pid.isdigit() and not process_alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            log.info("removed %d unfinished feature-cache files of processes that died: %s", len(removed),
                     ", ".join(p.name for p in removed))
        return removed

    def key(self, identity: dict, dtype: str) -> str | None:
        """The entry name, or None when the dataset cannot be fingerprinted (then nothing is cached)."""
        fingerprint = dataset_fingerprint(identity.get("dataset"))
        if fingerprint is None:
            return None
        extractor = identity["extractor"]
        weights = {name: _file_identity(value) for name, value in extractor.get("kwargs", {}).items()}
        record = [CACHE_VERSION, extractor, weights, identity["embedder"], dtype, fingerprint]
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def lookup(self, key: str) -> tuple[FeatureFile, dict] | None:
        path, meta_path = self.directory / f"{key}.npy", self.directory / f"{key}.json"
        if not path.is_file() or not meta_path.is_file():
            return None
        try:
            return FeatureFile(path), json.loads(meta_path.read_text())
        except (ValueError, OSError):  # incomplete or foreign: recompute
            return None

    def writer(self, key: str, dim: int, dtype: torch.dtype) -> FileWriter:
        """A file next to the entry, under a temporary name; ``commit`` moves it into place."""
        return FileWriter(self.directory / f".{key}.{os.getpid()}.tmp.npy", dim, dtype)

    def commit(self, writer: FileWriter, key: str, meta: dict) -> FeatureFile:
        """Finish the file, move it into place, then write ``meta`` (grid, input size): the entry's last step."""
        final = self.directory / f"{key}.npy"
        os.replace(writer.finish().path, final)
        try:
            write_json_atomic(self.directory / f"{key}.json", meta)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return FeatureFile(final)


class FeatureStore:
    """Where ``fit`` keeps the training features (see the module docstring)."""

    def __init__(self, options: StorageOptions, device: str | torch.device = "cpu") -> None:
        self.options, self.device = options, torch.device(device)
        self.dtype = DTYPES[options.dtype]
        self.cache = FeatureCache(options.cache_dir) if options.cache_dir else None
        if self.cache is not None and not self.cache.usable():
            self.cache = None  # the fit still runs, only without the cache (FeatureCache.usable warned)
        if self.cache is not None:
            self.cache.remove_orphans()

    def gather(self, batches: Iterable[EmbeddedBatch], images: int | None = None,
               identity: dict | None = None) -> TrainingFeatures:
        """All the batches' patch features as one ``TrainingFeatures``. ``images``: how many the batches
        hold (sizes the buffer; None: grown as needed). ``identity`` (extractor and embedder specs, the
        dataset) keys the cache; on a hit ``batches`` is not iterated."""
        key = self.cache.key(identity, self.options.dtype) if self.cache and identity else None
        hit = self.cache.lookup(key) if key else None
        if hit is not None:
            rows, meta = hit
            return TrainingFeatures(rows, meta["grid"], meta["input_size"], self.device, cached=True)
        writer = grid = input_size = None
        try:
            for batch in batches:
                if writer is None:  # sized from the first batch: patches per image x images
                    count, patches, dim = batch.features.shape
                    writer = (self.cache.writer(key, dim, self.dtype) if key
                              else self._new_writer(patches * (images or count), dim))
                writer.append(batch.features)
                grid, input_size = batch.grid, batch.input_size
            if writer is None:
                raise ValueError("the training loader yielded no images: nothing to build a memory bank from")
            rows = (self.cache.commit(writer, key, {"grid": list(grid), "input_size": list(input_size)}) if key
                    else writer.finish())
        except BaseException:
            if writer is not None:
                writer.discard()  # no half-written spill or cache file left behind
            raise
        spilled = isinstance(writer, FileWriter) and not key
        return TrainingFeatures(rows, grid, input_size, self.device, temporary=spilled)

    def _new_writer(self, rows: int, dim: int) -> MemoryWriter | FileWriter:
        """In memory when the buffer fits the budget; else in a file (``spill_dir``, or a temporary folder when
        none is set), when the disk has room; else a ``BufferTooLargeError`` before the fit goes on."""
        size = rows * dim * self.dtype.itemsize
        if self.options.spill_dir is not None and size / 1e9 > self.options.spill_above_gb:
            return self._file_writer(Path(self.options.spill_dir).expanduser(), rows, dim, size, "storage.spill_dir")
        budget = memory_budget(self.options.memory_budget_gb, self.device)
        if size <= budget:
            return MemoryWriter(rows, dim, self.dtype, self.device)
        folder = Path(tempfile.gettempdir())
        log.warning("the training buffer (%s) does not fit in the memory budget (%.2f GB%s): spilling it to a "
                    "file in %s (set storage.spill_dir to choose the disk)", _describe(rows, dim, self.dtype),
                    budget / 1e9, "" if self.options.memory_budget_gb is None else ", storage.memory_budget_gb",
                    folder)
        return self._file_writer(folder, rows, dim, size, "the temporary folder", budget)

    def _file_writer(self, folder: Path, rows: int, dim: int, size: int, what: str,
                     budget: float | None = None) -> FileWriter:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if size > free:
            memory = "" if budget is None else f"more than the memory budget ({budget / 1e9:.2f} GB) and "
            raise BufferTooLargeError(
                f"the training buffer needs {_describe(rows, dim, self.dtype)}: {memory}more than the free disk in "
                f"{what} {folder} ({free / 1e9:.2f} GB). Shrink it with storage.dtype=float16 (half), a smaller "
                "patchcore.embedder.embed_dim, a smaller dataset.resize/dataset.image_size, fewer or deeper "
                "backbone.layers (a coarser grid), or dataset.train_limit; or set storage.spill_dir to a disk with "
                "room")
        path = folder / f"features-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        log.info("buffering %.2f GB of training features in %s", size / 1e9, path)
        return FileWriter(path, dim, self.dtype)


class BufferTooLargeError(MemoryError):
    """The training buffer fits neither in memory nor on disk; the message names the settings that shrink it."""


def _describe(rows: int, dim: int, dtype: torch.dtype) -> str:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return f"{rows * dim * itemsize / 1e9:.2f} GB ({rows} patches x {dim} dims x {itemsize} bytes)"


# Share of the available memory the buffer may take: the coreset's projection and distances and the bank
# need working memory next to it.
_AVAILABLE_SHARE = 0.8


def memory_budget(budget_gb: float | None, device: torch.device) -> float:
    """Bytes the training buffer may take on ``device``: ``budget_gb``, else a share of what is available."""
    if budget_gb is not None:
        return budget_gb * 1e9
    if device.type == "cuda":
        return _AVAILABLE_SHARE * torch.cuda.mem_get_info(device)[0]
    return _AVAILABLE_SHARE * available_memory()


def available_memory() -> float:
    """Bytes of memory available to a new allocation (MemAvailable; psutil where /proc is absent)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:  # nowhere to ask: no limit (the allocation itself then says what failed)
        return float("inf")
