"""The thread budget, and running torch single-threaded while Python threads split the work.

Who owns the thread budget: ``torch.get_num_threads()`` is the budget, set once by the entry
point (torch's default, or ``--threads`` / ``torch.set_num_threads``). Exactly one layer spends
it at a time: the outermost layer that parallelises reads it, enters ``single_threaded_torch``
and runs that many Python threads, each with torch on one thread. A layer called inside it
then reads a budget of 1 and runs its blocks serially, so threads never multiply.

Who may nest inside whom (outermost first):

1. ``core.detector.collect_predictions`` (pieces of test images on threads, through
   ``PatchCore.predict``) - inside it, ``PatchCore.score`` -> ``MemoryBank.search``, whose
   pruned search (``core.search.pruned``) and faiss search (``core.search.faiss_index``, OpenMP
   threads = the budget) then run on the one thread they are given.
2. ``core.coreset`` (the fast selection's block updates on threads) - called by ``fit``, where
   nothing parallelises around it.
3. ``core.search.pruned`` (blocks of queries on threads) - the outermost layer when the bank is
   searched directly (a benchmark, ``PatchCore.score`` called on its own or with one worker).

On a CPU shared with other jobs, torch's second OpenMP thread can make every small operation
wait for a descheduled core; that is why these layers use Python threads instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
