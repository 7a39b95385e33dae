"""Bound-pruned exact search: full distances only where a cheap lower bound cannot rule a pair out.

In the principal-axes frame (``core.search.span.Frame``: the bank's span, or all dimensions
rotated), with ``p`` the first axes and ``r`` the rest, ``|q - b|^2 >= |q|^2 + |b|^2 - 2 (q_p.b_p +
|q_r| |b_r|)``: one matrix product with ``bound_width`` columns gives every pair's bound. Per block
of queries, the first ``seed_rows`` bank rows (a coreset's first picks, spread over the bank) give
each query its k best so far (the exact distances of the smallest bounds); then the bank is
streamed in cache-sized chunks and a pair gets its exact distance only when its bound is below
the query's current k-th best (``_refine``). Bounds are used while still in the cache and never
written to memory. A query that needs exact distances to more than ``give_up`` of the bank (far
from all of it) is handed to the reference's matrix product instead. Exact: the same neighbours
as the reference, up to float32 rounding of exact ties. CPU only, with numba; on another device
the reference's products run in the same frame.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from core.linalg import FASTMATH, TOL
from core.search.reference import BLOCK_ELEMENTS, STREAM_ROWS, nearest
from core.search.span import Frame, PrincipalAxes
from core.threads import single_threaded_torch

try:  # optional: without numba every distance is computed (core.search.choose_strategy)
    import numba
except ImportError:  # pragma: no cover - the torch path is tested by patching numba out
    numba = None

# The smallest bank worth pruning: below it the bound's product costs as much as the distances.
MIN_BANK = 4096
# Columns of the lower bound: principal axes plus the norm of the rest. At least BOUND_WIDTH; wider when
# those axes hold less than BOUND_VARIANCE of the bank's variance (a bound over too little of it prunes
# almost nothing: the official embedding's full-rank banks), at most MAX_BOUND_WIDTH (docs/performance.md).
BOUND_WIDTH = 48
BOUND_VARIANCE = 0.9
MAX_BOUND_WIDTH = 256
# A query needing exact distances to more than this fraction of the bank goes to the matrix product.
GIVE_UP = 0.02
QUERY_BLOCK = 256  # queries per block: one Python thread's unit of work
SEED_ROWS = 2048  # the first bank rows seed each query's k best
CHUNK_ROWS = 512  # bank rows per bound product after the seed: [512 x 256] floats stay in the L2 cache


def bound_width_for(variances: torch.Tensor) -> int:
    """The bound's columns for a bank whose principal variances (largest first) are ``variances``: the
    fewest axes holding ``BOUND_VARIANCE`` of the total, plus the norm column, within
    [``BOUND_WIDTH``, ``MAX_BOUND_WIDTH``]."""
    share = variances.clamp_min(0).cumsum(0) / variances.clamp_min(0).sum().clamp_min(1e-30)
    axes = int((share < BOUND_VARIANCE).sum()) + 1
    return max(BOUND_WIDTH, min(MAX_BOUND_WIDTH, axes + 1))


def pays_off(bank_rows: int, search_dim: int, device: torch.device, bound_width: int = BOUND_WIDTH) -> bool:
    """Whether this search can run and beats the matrix product: numba, a CPU bank, enough rows, and more
    search dimensions than the bound's columns."""
    return numba is not None and device.type == "cpu" and bank_rows >= MIN_BANK and search_dim > bound_width


class PrunedSearch:
    """Exact k-NN with lower-bound pruning (see the module docstring); the knobs are for benchmarks."""

    name = "pruned"

    def __init__(self, bound_width: int = BOUND_WIDTH, query_block: int = QUERY_BLOCK, seed_rows: int = SEED_ROWS,
                 chunk_rows: int = CHUNK_ROWS, give_up: float = GIVE_UP, block_elements: int = BLOCK_ELEMENTS,
                 stream_rows: int = STREAM_ROWS) -> None:
        if numba is None:
            raise ImportError("the pruned search needs numba: pip install numba (or use another strategy)")
        self.bound_width, self.query_block = bound_width, query_block
        self.seed_rows, self.chunk_rows = seed_rows, chunk_rows
        self.give_up, self.block_elements, self.stream_rows = give_up, block_elements, stream_rows

    def build(self, features: torch.Tensor, frame: Frame | None = None) -> PrunedSearch:
        """``frame``: the bank's span, else all dimensions rotated to the principal axes (the bound needs
        the axes of largest variance first)."""
        if frame is None:
            axes = PrincipalAxes.of(features)
            frame = Frame.span(features, axes) or Frame.rotated(features, axes)
        self.frame = frame
        self.columns = _bound_columns(frame.coords, self.bound_width)  # the bound's operands, bank side
        self.bank_norms = (frame.norms * (1 - TOL)).numpy()  # shrunk by the tolerance: a conservative bound
        return self

    @property
    def search_dim(self) -> int:
        return self.frame.dim

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords, outside = self.frame.queries(queries)
        if coords.device.type == "cpu":
            squared, indices = self._search_cpu(coords, k)
        else:
            squared, indices = self._nearest(coords, k)
        if outside is not None:
            squared += outside[:, None]
        return squared.clamp_min_(0).sqrt_(), indices

    def to(self, device: torch.device) -> None:
        self.frame.to(device)  # the bound's operands stay on the CPU, the only device that uses them

    def _nearest(self, coords: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest(self.frame.coords, self.frame.norms, coords, k, self.block_elements, self.stream_rows)

    def _search_cpu(self, coords: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks of queries on ``torch.get_num_threads()`` Python threads, torch single-threaded inside
        (the thread budget: see ``core.threads``); then the queries that gave up, by matrix product."""
        columns, bank_norms = self.columns, self.bank_norms
        coords = coords.contiguous()
        query_columns = _bound_columns(coords, columns.shape[1])
        query_norms = (coords * coords).sum(dim=1).numpy()
        squared = np.full((len(coords), k), np.inf, dtype=np.float32)
        indices = np.full((len(coords), k), -1, dtype=np.int64)
        evaluated = np.zeros(len(coords), dtype=np.int64)
        rows, block_size = len(columns), self.query_block
        seed_rows = min(self.seed_rows, rows)
        chunks = [(0, seed_rows)] + [(row, min(row + self.chunk_rows, rows))
                                     for row in range(seed_rows, rows, self.chunk_rows)]
        cap = max(64, int(self.give_up * rows))
        queries, bank = coords.numpy(), self.frame.coords.numpy()

        def run(start: int) -> None:
            stop = min(start + block_size, len(coords))
            buffer = _thread_buffer(max(seed_rows, self.chunk_rows) * (stop - start))
            query_t = query_columns[start:stop].T.contiguous()
            block = (query_norms[start:stop], queries[start:stop], bank, squared[start:stop], indices[start:stop])
            limit = np.empty(stop - start, dtype=np.float32)
            for first, last in chunks:
                dots = buffer[: (last - first) * (stop - start)].view(last - first, -1)
                torch.mm(columns[first:last], query_t, out=dots)
                if first == 0:
                    _seed(dots.numpy(), bank_norms, *block[1:])
                    limit[:] = squared[start:stop, k - 1] * (1 + TOL) - query_norms[start:stop] * (1 - TOL)
                _refine(dots.numpy(), bank_norms, first, *block, limit, evaluated[start:stop], cap, TOL)

        starts = range(0, len(coords), block_size)
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
            squared[hard], indices[hard] = self._nearest(coords[hard], k)
        return squared, indices


def _bound_columns(coords: torch.Tensor, width: int) -> torch.Tensor:
    """``[the first width - 1 coordinates, the norm of the others]`` per row: the operands of the bound."""
    rest = coords[:, width - 1 :]
    return torch.cat([coords[:, : width - 1], (rest * rest).sum(dim=1, keepdim=True).sqrt_()], dim=1)


_buffers = threading.local()


def _thread_buffer(size: int) -> torch.Tensor:
    """A float32 scratch buffer per thread, kept between searches: a fresh multi-MB tensor per block of
    queries costs its page faults again every time."""
    buffer = getattr(_buffers, "tensor", None)
    if buffer is None or buffer.numel() < size:
        buffer = _buffers.tensor = torch.empty(size)
    return buffer


if numba is not None:

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=FASTMATH)
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

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=FASTMATH)
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

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=FASTMATH)
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

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=FASTMATH)
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
