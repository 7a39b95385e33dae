"""The thread budget, and running torch single-threaded while Python threads split the work.

Who owns the thread budget: ``torch.get_num_threads()`` is the budget, set once by the entry
point (torch's default, or ``--threads`` / ``torch.set_num_threads``). Exactly one layer spends
it at a time: the outermost layer that parallelises reads it, enters ``single_threaded_torch``
and runs that many Python threads, each with torch on one thread. A layer called inside it
then reads a budget of 1 and runs its blocks serially, so threads never multiply.

Who may nest inside whom (outermost first):

1. ``core.detector.collect_predictions`` (pieces of test images on threads through ``pipelined``,
   from ``PatchCore.predict``) - inside it, ``PatchCore.score`` -> ``MemoryBank.search``, whose
   pruned search (``core.search.pruned``) and faiss search (``core.search.faiss_index``, OpenMP
   threads = the budget) then run on the one thread they are given.
2. ``core.coreset`` (the fast selection's block updates on threads) - called by ``fit``, where
   nothing parallelises around it.
3. ``core.search.pruned`` (blocks of queries on threads) - the outermost layer when the bank is
   searched directly (a benchmark, ``PatchCore.score`` called on its own or with one worker).
4. ``core.export`` (``ExportedModel.run``: pieces of the batch through ``in_pieces``;
   ``ExportedModel.run_batches`` and ``predict_images``: pieces of every batch through ``pipelined``;
   each piece's ONNX Runtime / OpenVINO run on one intra-op thread, the fast form's search and scoring
   head inside the same single-threaded scope) - the outermost layer of an exported model.

On a CPU shared with other jobs, torch's second OpenMP thread can make every small operation
wait for a descheduled core; that is why these layers use Python threads instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

# Images per task when a stream of batches is split over threads (``pipelined``): small enough to keep every
# thread busy to the last image, large enough for the search's matrix products.
PIECE = 4


@contextmanager
def single_threaded_torch() -> Iterator[int]:
    """Torch ops run on the calling thread only, for the duration (restored after); yields the thread
    count that was set before, i.e. how many Python threads the caller may use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def thread_budget() -> int:
    """The budget the outermost layer spends (see above): torch's thread count, set by the entry point."""
    return torch.get_num_threads()


def in_pieces(work: Callable, batch, threads: int | None = None) -> list[Sequence]:
    """``work(piece)`` over ``threads`` (default: the budget) near-equal pieces of ``batch`` (split along its
    first axis), each on its own Python thread with torch single-threaded, in order; returns each piece's
    result. A batch smaller than the budget runs one image per thread; one thread (or one image) runs
    ``work(batch)`` as it is, on the caller's thread."""
    threads = thread_budget() if threads is None else threads
    count = min(max(1, threads), len(batch))
    if count <= 1:
        return [work(batch)]
    size = -(-len(batch) // count)  # ceil: the last piece is the short one
    pieces = [batch[start : start + size] for start in range(0, len(batch), size)]
    with single_threaded_torch(), ThreadPoolExecutor(len(pieces)) as pool:
        return list(pool.map(work, pieces))


def pipelined(work: Callable, batches: Iterable[tuple[Any, Sequence]], workers: int | None = None
              ) -> Iterator[tuple[Any, list]]:
    """For each ``(batch, images)`` of ``batches``, in order: ``(batch, [work(piece), ...])`` over the images' pieces
    of ``PIECE``, the pieces of every batch on ``workers`` (default: the budget) Python threads with torch
    single-threaded. Unlike ``in_pieces`` on one batch at a time, no thread waits at the end of a batch for the
    slowest piece (search times differ from image to image), and ``batches`` is read (images decoded, a loader
    advanced) while the threads work. Backpressure: a batch is handed back once enough pieces are queued behind
    it to keep every worker busy. One worker: ``[work(images)]`` per batch, on the caller's thread."""
    workers = thread_budget() if workers is None else workers
    if workers <= 1:
        for batch, images in batches:
            yield batch, [work(images)]
        return
    pending: deque = deque()
    queued = 0  # pieces submitted and not yet handed back
    with single_threaded_torch(), ThreadPoolExecutor(workers) as pool:
        for batch, images in batches:
            futures = [pool.submit(work, images[start : start + PIECE]) for start in range(0, len(images), PIECE)]
            pending.append((batch, futures))
            queued += len(futures)
            while queued - len(pending[0][1]) >= workers:
                batch, futures = pending.popleft()
                queued -= len(futures)
                yield batch, [future.result() for future in futures]
        while pending:
            batch, futures = pending.popleft()
            yield batch, [future.result() for future in futures]
