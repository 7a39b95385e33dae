"""The memory bank (nearest-neighbour search over the coreset) and the training-feature buffer.

``MemoryBank`` answers k-nearest-neighbour queries:

- ``backend="exact"`` (default): exact Euclidean search, one matrix product per block of
  queries with precomputed bank norms (||q||^2 + ||b||^2 - 2 q.b). When the bank spans a
  subspace of lower dimension than its features (EfficientNet-Lite0's 1024-d embedding is
  an average-pooled copy of 152 channels, so its banks have rank 152), queries and bank are
  expressed in an orthonormal basis of that span about the bank's mean and the part of
  each query outside it is added back as a constant: the same distances (to float32
  rounding), several times fewer operations. Nothing to configure; it is skipped when the
  bank is (nearly) full rank. On the CPU (with numba), banks of ``_PRUNE_MIN_BANK`` rows or
  more are searched with a lower bound from the first principal axes that rules out almost
  every pair before its distance is computed (``_search_pruned``): still exact.
  ``search_factored`` takes queries as ``channels @ projection`` (an embedding that pools few
  channels up to many dimensions) and does the per-query work in the channels' dimension.
- ``backend="faiss"``: ``index="flat"`` (exact, faiss's BLAS search) or ``index="ivf"``
  (inverted lists: ``nlist`` k-means cells, ``nprobe`` of them searched per query;
  approximate, distances of the neighbours found are exact). Runs on the GPU when the bank
  is on one and faiss was built with GPU support.

Banks larger than the GPU stay in CPU memory and are streamed to it in chunks.

``MemoryOptions`` is the ``memory`` config node: the search backend plus where the
training features are buffered during ``fit`` (``FeatureBuffer``: preallocated, float32 or
float16, in memory or in a file under ``spill_dir``), and ``cache_dir`` for the feature
cache (``core.feature_cache``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.coreset import column_mean
from core.io import atomic_write
from core.threads import single_threaded_torch

try:  # optional: exact search with lower-bound pruning (else every distance is computed)
    import numba
except ImportError:  # pragma: no cover - the torch path is tested by patching numba out
    numba = None

log = logging.getLogger(__name__)

# Bound the [queries x bank] distance block to about this many floats.
_BLOCK_ELEMENTS = 4 * 1024 * 1024
# Bank rows per chunk: bounds the distance block for very large banks, and what is streamed to the
# compute device when the bank lives elsewhere.
_STREAM_ROWS = 262144
# Directions whose variance is below this fraction of the largest are numerically absent.
_RANK_TOL = 1e-9
# Use the span basis only when it saves at least this fraction of the dimensions.
_REDUCE_BELOW = 0.75
# The span and principal axes come from this many sampled bank rows (then checked on all rows).
_SAMPLE_ROWS = 4096
_SPAN_CHECK = 1e-6
# Pruned exact search: columns of the lower bound (principal axes + the norm of the rest), and the
# smallest bank it is used for.
_BOUND_WIDTH = 48
_PRUNE_MIN_BANK = 4096
_PRUNE_GIVE_UP = 0.02  # a query needing full distances to more than this fraction of the bank goes to GEMM
_QUERY_BLOCK = 256  # queries per block: one Python thread's unit of work
_SEED_ROWS = 2048  # the first bank rows (a coreset's first picks: spread over the bank) seed each query
_CHUNK_ROWS = 512  # bank rows per bound product after the seed: [512 x 256] floats stay in the L2 cache
_TOL = 1e-5

BACKENDS = ("exact", "faiss")
INDEXES = ("flat", "ivf")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


_buffers = threading.local()


def _thread_buffer(size: int) -> torch.Tensor:
    """A float32 scratch buffer per thread, kept between searches: a fresh multi-MB tensor per block of
    queries costs its page faults again every time (a tenth of the search)."""
    buffer = getattr(_buffers, "tensor", None)
    if buffer is None or buffer.numel() < size:
        buffer = _buffers.tensor = torch.empty(size)
    return buffer


class MemoryBank:
    """Holds ``features[M, D]`` and answers k-nearest-neighbour queries (see the module docstring)."""

    def __init__(self, features: torch.Tensor | None = None, backend: str = "exact", index: str = "flat",
                 nlist: int | None = None, nprobe: int = 16, reduce: bool = True, prune: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"memory.backend={backend!r}: choose one of {BACKENDS}")
        if index not in INDEXES:
            raise ValueError(f"memory.index={index!r}: choose one of {INDEXES}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"memory.nlist={nlist} must be positive, or null for 4*sqrt(bank size)")
        if nprobe < 1:
            raise ValueError(f"memory.nprobe={nprobe} must be positive")
        if backend == "faiss":
            _import_faiss()  # fail at construction, before any fitting, when faiss is missing
        self.backend, self.index, self.nlist, self.nprobe = backend, index, nlist, nprobe
        self.reduce = reduce  # False: always search in all feature dimensions (for comparisons)
        self.prune = prune  # False: compute every distance (for comparisons)
        self._pruned = self._outside = False
        self.features = torch.empty(0, 0)
        self.mean = torch.empty(0)
        self.basis: torch.Tensor | None = None  # [D, r] orthonormal basis of the bank's span, or None
        self.coords = torch.empty(0, 0)  # bank in search coordinates: (features - mean) @ basis
        self.norms = torch.empty(0)
        self.device = torch.device("cpu")
        self._faiss = None
        self._plans: dict[int, tuple] = {}  # search_factored's per-projection matrices
        if features is not None:
            self.build(features)

    def build(self, features: torch.Tensor) -> MemoryBank:
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"memory bank needs a non-empty [M, D] tensor, got shape {tuple(features.shape)}")
        self.features = features.float().contiguous()
        self.device = self.features.device
        self._prepare()
        return self

    def _prepare(self) -> None:
        """Search coordinates: centred, in the principal axes of a sample of the bank, restricted to the
        bank's span when that has clearly fewer dimensions (checked on every bank row)."""
        features = self.features
        dim = features.shape[1]
        self.mean = column_mean(features).float()
        generator = torch.Generator().manual_seed(0)
        sample = torch.randperm(len(features), generator=generator)[:_SAMPLE_ROWS].to(features.device)
        centred = features[sample].double() - self.mean.double()
        values, vectors = torch.linalg.eigh(centred.T @ centred)
        rank = int((values > values[-1].clamp_min(1e-30) * _RANK_TOL).sum())
        self.basis, self._outside = None, False
        if self.reduce and 0 < rank <= _REDUCE_BELOW * dim:
            basis = vectors[:, -rank:].flip(1).float().contiguous()  # largest variance first
            coords, energy, kept = self._transform(basis)
            if energy - kept <= _SPAN_CHECK * energy:  # the sample spanned the whole bank
                self.basis, self.coords, self._outside = basis, coords, True
        search_dim = dim if self.basis is None else rank
        self._pruned = (self.prune and self.backend == "exact" and numba is not None and features.device.type == "cpu"
                        and len(features) >= _PRUNE_MIN_BANK and search_dim > _BOUND_WIDTH)
        if self.basis is None and self._pruned:  # full rank: rotate to the principal axes for the bound
            self.basis = vectors.flip(1).float().contiguous()
            self.coords = self._transform(self.basis)[0]
        elif self.basis is None:
            self.coords = self._transform(None)[0]
        self.norms = (self.coords * self.coords).sum(dim=1)
        if self._pruned:  # the bound's columns and the bank norms (shrunk by the tolerance), used by every search
            self._bound_columns = _bound_columns(self.coords, _BOUND_WIDTH)
            self._bound_norms = (self.norms * (1 - _TOL)).numpy()
        self._faiss = None
        if self.backend == "faiss":
            self._faiss = self._build_faiss()
        self._plans = {}  # search_factored's per-projection matrices belong to this basis

    def _transform(self, basis: torch.Tensor | None, chunk: int = 16384) -> tuple[torch.Tensor, float, float]:
        """``(features - mean) @ basis`` block by block, with the total and the kept squared length."""
        features = self.features
        coords = torch.empty(len(features), features.shape[1] if basis is None else basis.shape[1],
                             device=features.device)
        energy = kept = 0.0
        for start in range(0, len(features), chunk):
            centred = features[start : start + chunk] - self.mean
            block = centred if basis is None else centred @ basis
            coords[start : start + chunk] = block
            energy += float((centred * centred).sum())
            kept += float((block * block).sum())
        return coords, energy, kept

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def search_dim(self) -> int:
        """Dimensions the search works in (the rank of the bank when that is lower than ``dim``)."""
        return self.coords.shape[1]

    def to(self, device: torch.device | str) -> MemoryBank:
        """Move the bank; a bank too large for the GPU stays in CPU memory and is streamed in chunks."""
        device = torch.device(device)
        self.device = device
        self._plans = {}
        if len(self) == 0:
            return self
        try:
            self.features = self.features.to(device)
            self.coords, self.norms = self.coords.to(device), self.norms.to(device)
        except torch.OutOfMemoryError:
            log.warning("memory bank (%d x %d) does not fit on %s: kept in CPU memory, streamed in chunks",
                        len(self), self.dim, device)
            self.features = self.features.cpu()
            self.coords, self.norms = self.coords.cpu().pin_memory(), self.norms.cpu().pin_memory()
            torch.cuda.empty_cache()
        self.mean = self.mean.to(device)
        self.basis = None if self.basis is None else self.basis.to(device)
        if self.backend == "faiss":
            self._faiss = self._build_faiss()
        return self

    # ------------------------------------------------------------------------- search
    def _query_coords(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries in search coordinates, and the squared length of the part outside the bank's span."""
        centred = queries.to(self.device, torch.float32) - self.mean
        if self.basis is None:
            return centred, None
        coords = centred @ self.basis
        if not self._outside:
            return coords, None
        residual = torch.addmm(centred, coords, self.basis.T, alpha=-1.0)  # directly: no cancellation
        return coords, (residual * residual).sum(dim=1)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances[Q, k], indices[Q, k])`` of the k nearest bank features, nearest first."""
        self._check_searchable(queries.shape[-1])
        return self._search_coords(*self._query_coords(queries), k)

    def search_factored(self, channels: torch.Tensor, projection: torch.Tensor, k: int = 1
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``search(channels @ projection, k)`` without forming the ``D``-dim queries.

        A patch embedding that pools ``C < D`` channels up to ``D`` (EfficientNet-Lite0: 152 -> 1024)
        gives queries whose search coordinates are ``channels @ (projection @ basis)`` and whose squared
        length outside the bank's span is a quadratic form in ``channels``: both ``C``-dim work per
        query instead of ``D``-dim (a tenth of a prediction here). The same distances to float32 rounding."""
        self._check_searchable(projection.shape[1])
        plan = self._factored_plan(projection)
        channels = channels.to(self.device, torch.float32)
        if plan is None:  # no span basis, or no fewer dimensions: nothing to gain
            return self.search(channels @ projection.to(channels), k)
        coords_map, mean_coords, gram, cross, constant = plan
        coords = torch.addmm(mean_coords, channels, coords_map, beta=-1.0)
        outside = None
        if gram is not None:
            outside = (((channels @ gram) * channels).sum(dim=1) - 2 * (channels @ cross) + constant).clamp_min_(0)
        return self._search_coords(coords, outside, k)

    def _factored_plan(self, projection: torch.Tensor) -> tuple | None:
        """Per projection (cached while the bank lasts): ``projection @ basis``, the mean's coordinates and
        the quadratic form of the part outside the span (``None`` when nothing lies outside)."""
        if self.basis is None or projection.shape[0] >= self.dim:
            return None
        cached = self._plans.get(id(projection))
        if cached is not None and cached[0] is projection:
            return cached[1]
        basis, mean = self.basis.double(), self.mean.double()
        factors = projection.to(self.device, torch.float64)
        coords_map, mean_coords = factors @ basis, mean @ basis
        gram = cross = constant = None
        if self._outside:  # (c P - m)(I - B B^T) = c A - r: |.|^2 = c (A A^T) c^T - 2 c (A r^T) + |r|^2
            outside_map, mean_outside = factors - coords_map @ basis.T, mean - mean_coords @ basis.T
            gram, cross = outside_map @ outside_map.T, outside_map @ mean_outside
            constant = float(mean_outside @ mean_outside)
            gram, cross = gram.float(), cross.float()
        plan = (coords_map.float(), mean_coords.float(), gram, cross, constant)
        self._plans[id(projection)] = (projection, plan)
        return plan

    def _check_searchable(self, dim: int) -> None:
        if len(self) == 0:
            raise RuntimeError("memory bank is empty: fit the model (or load a saved one) first")
        if dim != self.dim:
            raise ValueError(f"query dimension {dim} does not match the bank's {self.dim}")

    def _search_coords(self, coords: torch.Tensor, outside: torch.Tensor | None, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, len(self))
        if self._faiss is not None:
            squared, indices = self._search_faiss(coords, k)
        elif self._pruned and coords.device.type == "cpu":
            squared, indices = self._search_pruned(coords, k)
        else:
            squared, indices = self._search_exact(coords, k)
        if outside is not None:
            squared += outside[:, None]
        return squared.clamp_min_(0).sqrt_(), indices

    def _search_exact(self, coords: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = min(_STREAM_ROWS, len(self))  # bank rows per chunk (streamed when on another device)
        block = max(1, _BLOCK_ELEMENTS // rows)
        distances, indices = [], []
        for start in range(0, len(coords), block):
            chunk = coords[start : start + block]
            chunk_norms = (chunk * chunk).sum(dim=1, keepdim=True)
            best = where = None
            for offset in range(0, len(self), rows):
                bank = self.coords[offset : offset + rows].to(coords.device, non_blocking=True)
                norms = self.norms[offset : offset + rows].to(coords.device, non_blocking=True)
                squared = torch.addmm(norms, chunk, bank.T, alpha=-2.0)
                squared += chunk_norms
                if k == 1:
                    part, part_where = squared.min(dim=1, keepdim=True)
                else:
                    part, part_where = torch.topk(squared, min(k, len(bank)), dim=1, largest=False)
                part_where += offset
                if best is None:
                    best, where = part, part_where
                else:  # merge with the chunks seen so far
                    best, order = torch.topk(torch.cat([best, part], dim=1), k, dim=1, largest=False)
                    where = torch.cat([where, part_where], dim=1).gather(1, order)
            best, where = self._recheck(chunk, where)
            distances.append(best)
            indices.append(where)
        return torch.cat(distances), torch.cat(indices)

    def _recheck(self, queries: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances of the neighbours found, from the differences themselves: the expansion
        |q|^2 + |b|^2 - 2 q.b loses precision for near neighbours (|q|^2 + |b|^2 >> d^2)."""
        valid = where.clamp_min(0)
        found = self.coords[valid.reshape(-1).to(self.coords.device)].to(queries.device).reshape(*where.shape, -1)
        squared = (found - queries[:, None, :]).square_().sum(dim=2).masked_fill_(where < 0, float("inf"))
        if where.shape[1] > 1:
            squared, order = torch.sort(squared, dim=1, stable=True)
            where = where.gather(1, order)
        return squared, where

    def _search_pruned(self, coords: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k-NN, computing full distances only where a cheap lower bound cannot rule a pair out.

        With ``p`` the first principal axes and ``r`` the rest, ``|q - b|^2 >= |q|^2 + |b|^2 - 2 (q_p.b_p +
        |q_r| |b_r|)``: one matrix product with ``_BOUND_WIDTH`` columns gives every bound. Per block of
        queries, the first ``_SEED_ROWS`` bank rows give each query its k best so far (the smallest bounds'
        exact distances); then the bank is streamed in cache-sized chunks, and a pair gets its exact
        distance only when its bound is below the query's current k-th best (``_refine``). Bounds are
        used while still in the cache and never written to memory.

        Torch runs single-threaded inside and blocks of queries go to ``torch.get_num_threads()``
        Python threads (see ``core.coreset._batched_loop`` for why)."""
        columns, bank_norms = self._bound_columns, self._bound_norms
        coords = coords.contiguous()
        query_columns = _bound_columns(coords, columns.shape[1])
        query_norms = (coords * coords).sum(dim=1).numpy()
        squared = np.full((len(coords), k), np.inf, dtype=np.float32)
        indices = np.full((len(coords), k), -1, dtype=np.int64)
        evaluated = np.zeros(len(coords), dtype=np.int64)
        rows = len(columns)
        seed_rows = min(_SEED_ROWS, rows)
        chunks = [(0, seed_rows)] + [(row, min(row + _CHUNK_ROWS, rows)) for row in range(seed_rows, rows, _CHUNK_ROWS)]
        cap = max(64, int(_PRUNE_GIVE_UP * rows))
        queries, bank = coords.numpy(), self.coords.numpy()

        def run(start: int) -> None:
            stop = min(start + _QUERY_BLOCK, len(coords))
            buffer = _thread_buffer(max(seed_rows, _CHUNK_ROWS) * (stop - start))
            query_t = query_columns[start:stop].T.contiguous()
            block = (query_norms[start:stop], queries[start:stop], bank, squared[start:stop], indices[start:stop])
            limit = np.empty(stop - start, dtype=np.float32)
            for first, last in chunks:
                dots = buffer[: (last - first) * (stop - start)].view(last - first, -1)
                torch.mm(columns[first:last], query_t, out=dots)
                if first == 0:
                    _seed(dots.numpy(), bank_norms, *block[1:])
                    limit[:] = squared[start:stop, k - 1] * (1 + _TOL) - query_norms[start:stop] * (1 - _TOL)
                _refine(dots.numpy(), bank_norms, first, *block, limit, evaluated[start:stop], cap, _TOL)

        starts = range(0, len(coords), _QUERY_BLOCK)
        with single_threaded_torch() as threads:
            if threads > 1 and len(starts) > 1:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(run, starts))
            else:
                for start in starts:
                    run(start)
        squared, indices = torch.from_numpy(squared), torch.from_numpy(indices)
        hard = torch.from_numpy(evaluated > cap).nonzero().squeeze(1)
        if len(hard):  # far from the whole bank: one matrix product is cheaper than thousands of distances
            squared[hard], indices[hard] = self._search_exact(coords[hard], k)
        return squared, indices

    # -------------------------------------------------------------------------- faiss
    def _build_faiss(self):
        faiss = _import_faiss()
        data = np.ascontiguousarray(self.coords.detach().cpu().numpy(), dtype=np.float32)
        dim = data.shape[1]
        if self.index == "flat":
            index = faiss.IndexFlatL2(dim)
        else:
            nlist = self.nlist or max(1, int(4 * math.sqrt(len(data))))
            nlist = max(1, min(nlist, len(data) // 39 or 1))  # faiss wants >= 39 training points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
            index.cp.seed = 1234
            index.train(data)
            index.nprobe = min(self.nprobe, nlist)
        index.add(data)
        if self.device.type == "cuda":
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                self._gpu_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, index)
            else:
                warnings.warn("memory.backend=faiss on device=cuda, but this faiss has no GPU support: searching "
                              "on the CPU (install faiss-gpu, or use memory.backend=exact for GPU search)",
                              stacklevel=3)
        return index

    def _search_faiss(self, coords: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _import_faiss()
        faiss.omp_set_num_threads(torch.get_num_threads())
        queries = np.ascontiguousarray(coords.detach().cpu().numpy(), dtype=np.float32)
        distances, indices = [], []
        for start in range(0, len(queries), 65536):
            _, where = self._faiss.search(queries[start : start + 65536], k)
            squared, where = self._recheck(coords[start : start + 65536], torch.from_numpy(where).long()
                                           .to(coords.device))
            distances.append(squared)
            indices.append(where)
        return torch.cat(distances), torch.cat(indices)

    # --------------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> None:
        features = self.features.cpu()
        atomic_write(path, lambda tmp: torch.save({"features": features}, tmp))

    @classmethod
    def load(cls, path: str | Path, **options) -> MemoryBank:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["features"], **options)


if numba is not None:
    _FASTMATH = {"reassoc", "nsz", "arcp", "contract"}  # no "nnan"/"ninf": the code compares against inf

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FASTMATH)
    def _distance(query, point, worst):  # pragma: no cover - compiled
        """Squared distance, principal axes first; stops once past ``worst`` (the k-th best so far)."""
        dim = query.shape[0]
        total = 0.0
        for begin in range(0, dim, 16):
            for j in range(begin, min(begin + 16, dim)):
                diff = query[j] - point[j]
                total += diff * diff
            if total > worst:
                break
        return total

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FASTMATH)
    def _insert(squared, indices, row, total, candidate):  # pragma: no cover - compiled
        """Put (total, candidate) into the row's sorted k best, ordered by (distance, index)."""
        last = squared.shape[1] - 1
        if total < squared[row, last] or (total == squared[row, last] and candidate < indices[row, last]):
            position = last
            while position > 0 and (squared[row, position - 1] > total or (
                    squared[row, position - 1] == total and indices[row, position - 1] > candidate)):
                squared[row, position] = squared[row, position - 1]
                indices[row, position] = indices[row, position - 1]
                position -= 1
            squared[row, position] = total
            indices[row, position] = candidate

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FASTMATH)
    def _seed(dots, bank_norms, queries, bank, squared, indices):  # pragma: no cover - compiled
        """Per query (column of ``dots[rows, n]``), the k rows with the smallest bounds, and their exact
        distances as the k best so far (the search's first upper bound)."""
        count, rows = dots.shape
        k = squared.shape[1]
        two = np.float32(2.0)
        if k == 1:  # a branch-free inner loop (SIMD)
            smallest = np.full(rows, np.inf, dtype=np.float32)
            where = np.zeros(rows, dtype=np.int64)
            for c in range(count):
                norm = bank_norms[c]
                for i in range(rows):
                    bound = norm - two * dots[c, i]
                    better = bound < smallest[i]
                    smallest[i] = bound if better else smallest[i]
                    where[i] = c if better else where[i]
            for i in range(rows):
                _insert(squared, indices, i, _distance(queries[i], bank[where[i]], np.inf), where[i])
            return
        smallest = np.full((rows, k), np.inf, dtype=np.float32)
        where = np.full((rows, k), -1, dtype=np.int64)
        for c in range(count):
            norm = bank_norms[c]
            for i in range(rows):
                bound = norm - two * dots[c, i]
                if bound < smallest[i, k - 1]:
                    _insert(smallest, where, i, bound, c)
        for i in range(rows):
            for s in range(k):
                c = where[i, s]
                if c >= 0:
                    _insert(squared, indices, i, _distance(queries[i], bank[c], np.inf), c)

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=_FASTMATH)
    def _refine(dots, bank_norms, offset, query_norms, queries, bank, squared, indices, limit, evaluated, cap,
                tol):  # pragma: no cover - compiled
        """Bank rows ``offset ..`` against one block of queries. ``dots[rows, n]`` holds the bound's products,
        so ``|b|^2 (1 - tol) - 2 dots`` is below ``limit = kth_best (1 + tol) - |q|^2 (1 - tol)`` only for
        pairs that may enter the k best: those get an exact distance (with early exit), and each
        improvement lowers the limit. A query past ``cap`` exact distances stops (``limit = -inf``)
        and is left to the caller's matrix product."""
        count, rows = dots.shape
        k = squared.shape[1]
        two = np.float32(2.0)
        for c in range(count):
            norm = bank_norms[offset + c]
            hit = False
            for i in range(rows):  # a branch-free pass first: most rows are ruled out for every query (SIMD)
                hit |= norm - two * dots[c, i] < limit[i]
            if not hit:
                continue
            row = offset + c
            for group in range(0, rows, 16):  # find the few hits: groups of 16 queries first (SIMD)
                last = min(group + 16, rows)
                hit = False
                for i in range(group, last):
                    hit |= norm - two * dots[c, i] < limit[i]
                if not hit:
                    continue
                for i in range(group, last):
                    if norm - two * dots[c, i] >= limit[i]:
                        continue
                    evaluated[i] += 1
                    if evaluated[i] > cap:
                        limit[i] = -np.inf
                        continue
                    seen = False
                    for s in range(k):  # the seeds come round again
                        seen = seen or indices[i, s] == row
                    if seen:
                        continue
                    total = _distance(queries[i], bank[row], squared[i, k - 1] * (1 + tol))
                    _insert(squared, indices, i, total, row)
                    limit[i] = squared[i, k - 1] * (1 + tol) - query_norms[i] * (1 - tol)


def _bound_columns(coords: torch.Tensor, width: int) -> torch.Tensor:
    """``[the first width - 1 coordinates, the norm of the others]`` per row: the operands of the bound."""
    rest = coords[:, width - 1 :]
    return torch.cat([coords[:, : width - 1], (rest * rest).sum(dim=1, keepdim=True).sqrt_()], dim=1)


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("memory.backend=faiss needs the faiss package: pip install faiss-cpu "
                          "(or faiss-gpu), or use memory.backend=exact") from error
    return faiss


# ---------------------------------------------------------------------------------------------
# Training-feature buffer


class FeatureBuffer:
    """Preallocated ``[rows, dim]`` store that ``fit`` streams patch features into.

    In memory (a torch tensor, float32 or float16), or, with ``path``, a raw file on disk
    written sequentially (the page cache holds it, not the process) that ``view()`` returns
    as ``DiskFeatures``, read back in chunks.
    """

    def __init__(self, rows: int, dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 path: str | Path | None = None) -> None:
        self.dim, self.dtype, self.filled = dim, dtype, 0
        self.path = None if path is None else Path(path)
        if self.path is None:
            self.data = torch.empty(rows, dim, dtype=dtype, device=device)
            self._file = None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.data = None
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in view()/discard()

    @property
    def nbytes(self) -> int:
        rows = self.filled if self.data is None else len(self.data)
        return rows * self.dim * torch.empty(0, dtype=self.dtype).element_size()

    def append(self, features: torch.Tensor) -> None:
        features = features.reshape(-1, self.dim).to(self.dtype)
        if self._file is not None:
            self._file.write(features.cpu().contiguous().numpy().tobytes())
        else:
            needed = self.filled + len(features)
            if needed > len(self.data):  # a loader without a known length: grow by half
                grown = torch.empty(max(needed, len(self.data) * 3 // 2), self.dim, dtype=self.dtype,
                                    device=self.data.device)
                grown[: self.filled] = self.data[: self.filled]
                self.data = grown
            self.data[self.filled : needed] = features
        self.filled += len(features)

    def view(self) -> torch.Tensor | DiskFeatures:
        """The filled rows: a tensor, or ``DiskFeatures`` for a buffer on disk."""
        if self._file is None:
            return self.data[: self.filled]
        self._file.close()
        meta = {"rows": self.filled, "dim": self.dim, "dtype": str(self.dtype).removeprefix("torch.")}
        Path(f"{self.path}.json").write_text(json.dumps(meta))
        return DiskFeatures(self.path)

    def discard(self) -> None:
        """Delete the file of a buffer on disk (nothing for one in memory)."""
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)
            Path(f"{self.path}.json").unlink(missing_ok=True)
        self.data = None


class DiskFeatures:
    """A read-only ``[rows, dim]`` feature file: ``len``, ``shape``, row slices and ``take`` give tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads(Path(f"{self.path}.json").read_text())
        self.rows, self.dim = int(meta["rows"]), int(meta["dim"])
        self.dtype = DTYPES[meta["dtype"]]
        self.np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        self.row_bytes = self.dim * np.dtype(self.np_dtype).itemsize
        self.device = torch.device("cpu")
        if self.path.stat().st_size != self.rows * self.row_bytes:
            raise ValueError(f"feature file {self.path} has {self.path.stat().st_size} bytes, its metadata says "
                             f"{self.rows} x {self.dim} {meta['dtype']}: the file is incomplete, delete it")

    def __len__(self) -> int:
        return self.rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    def _read(self, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as handle:
            handle.seek(start * self.row_bytes)
            data = np.fromfile(handle, dtype=self.np_dtype, count=(stop - start) * self.dim)
        return data.reshape(stop - start, self.dim)

    def __getitem__(self, item) -> torch.Tensor:
        if not isinstance(item, slice) or item.step not in (None, 1):
            return self.take(torch.as_tensor(item))
        start, stop, _ = item.indices(self.rows)
        return torch.from_numpy(self._read(start, max(start, stop)))

    def take(self, indices: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Rows ``indices`` (any order) as a tensor, reading the file once in chunks."""
        indices = torch.as_tensor(indices).long().cpu().reshape(-1)
        out = torch.empty(len(indices), self.dim, dtype=self.dtype)
        order = torch.argsort(indices)
        ordered = indices[order]
        bounds = torch.searchsorted(ordered, torch.arange(0, self.rows + chunk, chunk))
        for number, start in enumerate(range(0, self.rows, chunk)):
            lo, hi = int(bounds[number]), int(bounds[number + 1])
            if lo == hi:
                continue
            block = torch.from_numpy(self._read(start, min(self.rows, start + chunk)))
            out[order[lo:hi]] = block[ordered[lo:hi] - start]
        return out

    def to_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self._read(0, self.rows))


@dataclass
class MemoryOptions:
    """The ``memory`` config node: search backend, training-feature buffer, feature cache."""

    backend: str = "exact"  # exact | faiss
    index: str = "flat"  # faiss index: flat | ivf
    nlist: int | None = None  # ivf cells; null = 4 * sqrt(bank size)
    nprobe: int = 16  # ivf cells searched per query
    dtype: str = "float32"  # training-feature buffer: float32 | float16 (half the memory)
    spill_dir: str | None = None  # buffer the training features in a file here instead of in memory
    spill_above_gb: float = 0.0  # ... but only when the buffer would be larger than this
    cache_dir: str | None = None  # feature cache: refits with another coreset reuse the features

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"memory.dtype={self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.spill_above_gb < 0:
            raise ValueError(f"memory.spill_above_gb={self.spill_above_gb} must be >= 0")
        self.new_bank()  # validates backend/index/nlist/nprobe

    def search_options(self) -> dict:
        """What a bank needs to be searched as configured (saved with a model)."""
        return {"backend": self.backend, "index": self.index, "nlist": self.nlist, "nprobe": self.nprobe}

    def new_bank(self) -> MemoryBank:
        return MemoryBank(**self.search_options())

    def new_buffer(self, rows: int, dim: int, device: str | torch.device = "cpu") -> FeatureBuffer:
        dtype = DTYPES[self.dtype]
        size_gb = rows * dim * torch.empty(0, dtype=dtype).element_size() / 1e9
        if self.spill_dir is not None and size_gb > self.spill_above_gb:
            path = Path(self.spill_dir).expanduser() / f"features-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
            log.info("buffering %.2f GB of training features in %s", size_gb, path)
            return FeatureBuffer(rows, dim, dtype, path=path)
        return FeatureBuffer(rows, dim, dtype, device=device)

    def as_dict(self) -> dict:
        return asdict(self)
