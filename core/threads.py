"""Running torch single-threaded for a while, so Python threads can split the work instead.

On a CPU shared with other jobs, torch's second OpenMP thread can make every small
operation wait for a descheduled core; the coreset, the search and batch scoring therefore
run torch on the calling thread only and spread their own blocks over Python threads.
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
