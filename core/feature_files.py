"""The ``.npy`` files that hold training patch features (core/storage.py): a read-only file read in row
slices or by index, and the two writers a fit's buffer goes through (a growing tensor in memory, or a
file written sequentially). Read and written in chunks at an offset rather than memory-mapped: mapped
pages count in the process's resident memory once touched, which is what spilling avoids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class FeatureFile:
    """A read-only ``[rows, dim]`` ``.npy`` feature file: ``len``, ``shape``, ``read`` and ``take`` give tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"feature file {self.path} has .npy version {version}: delete it")
            shape, fortran_order, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran_order or len(shape) != 2 or dtype not in (np.float32, np.float16):
            raise ValueError(f"feature file {self.path} holds {dtype} {shape}, not [rows, dim] float32/float16")
        (self.rows, self.dim), self.np_dtype = shape, dtype
        self.dtype = torch.float16 if dtype == np.float16 else torch.float32
        self.row_bytes = self.dim * dtype.itemsize
        size = self.path.stat().st_size
        if size != self.offset + self.rows * self.row_bytes:
            raise ValueError(f"feature file {self.path} has {size} bytes, its header says {self.rows} x {self.dim} "
                             f"{dtype}: the file is incomplete, delete it")

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> torch.Tensor:
        data = np.fromfile(self.path, dtype=self.np_dtype, count=(stop - start) * self.dim,
                           offset=self.offset + start * self.row_bytes)
        return torch.from_numpy(data.reshape(stop - start, self.dim))

    def take(self, indices: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Rows ``indices`` (any order) as a tensor, reading the file once in chunks."""
        indices = torch.as_tensor(indices).long().cpu().reshape(-1)
        out = torch.empty(len(indices), self.dim, dtype=self.dtype)
        order = torch.argsort(indices)
        ordered = indices[order]
        bounds = torch.searchsorted(ordered, torch.arange(0, self.rows + chunk, chunk))
        for number, start in enumerate(range(0, self.rows, chunk)):
            lo, hi = int(bounds[number]), int(bounds[number + 1])
            if lo != hi:
                block = self.read(start, min(self.rows, start + chunk))
                out[order[lo:hi]] = block[ordered[lo:hi] - start]
        return out


class MemoryWriter:
    """A preallocated tensor that grows by half when a loader without a known length outruns it."""

    def __init__(self, rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.data, self.dim, self.dtype, self.filled = torch.empty(rows, dim, dtype=dtype, device=device), dim, dtype, 0

    def append(self, features: torch.Tensor) -> None:
        features = features.reshape(-1, self.dim).to(self.dtype)
        needed = self.filled + len(features)
        if needed > len(self.data):
            grown = torch.empty(max(needed, len(self.data) * 3 // 2), self.dim, dtype=self.dtype,
                                device=self.data.device)
            grown[: self.filled] = self.data[: self.filled]
            self.data = grown
        self.data[self.filled : needed] = features
        self.filled = needed

    def finish(self) -> torch.Tensor:
        return self.data[: self.filled]

    def discard(self) -> None:
        self.data = None


class FileWriter:
    """Writes a ``.npy`` file sequentially (the page cache holds it, not the process): the header for zero
    rows first, rewritten in place by ``finish`` with the row count."""

    def __init__(self, path: Path, dim: int, dtype: torch.dtype) -> None:
        self.path, self.dim, self.dtype, self.filled = path, dim, dtype, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()/discard()
        self._write_header()
        self.offset = self._file.tell()

    def _write_header(self) -> None:
        descr = np.lib.format.dtype_to_descr(np.dtype(str(self.dtype).removeprefix("torch.")))
        np.lib.format.write_array_header_1_0(self._file, {"descr": descr, "fortran_order": False,
                                                          "shape": (self.filled, self.dim)})

    def append(self, features: torch.Tensor) -> None:
        features = features.reshape(-1, self.dim).to(self.dtype)
        self._file.write(features.cpu().contiguous().numpy().tobytes())
        self.filled += len(features)

    def finish(self) -> FeatureFile:
        self._file.seek(0)
        self._write_header()
        if self._file.tell() != self.offset:  # numpy reserves room for the row count: never expected
            raise RuntimeError(f"the .npy header of {self.path} changed length")
        self._file.close()
        return FeatureFile(self.path)

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
