"""The memory bank on the GPU: exact search equal to the CPU's; a bank too large for the GPU kept in pinned
CPU memory and streamed in chunks (forced: a real out-of-memory error from a per-process memory cap, and a
small ``stream_rows``); faiss's GPU index where the installed faiss has one."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch

from core.search import MemoryBank, ReferenceSearch, SearchOptions, SpanSearch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STREAM_ROWS = 512  # a 20000-row bank: 40 chunks streamed per block of queries
RTOL = 1e-4  # the neighbours' distances are recomputed from the differences (recheck) on both devices
HEADROOM = 4 * 2**20  # the memory cap: room for small tensors (2 MiB blocks), none for a bank (20 MiB blocks)


def low_rank_bank(rows: int = 20000, dim: int = 256, rank: int = 48, seed: int = 0) -> torch.Tensor:
    """Rows near a rank-48 subspace: the span search's case (the reference ignores it)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=generator)
    return torch.randn(rows, rank, generator=generator) @ basis + 1e-3 * torch.randn(rows, dim, generator=generator)


def queries_near(bank: torch.Tensor, count: int = 3000, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(bank), (count,), generator=generator)
    return bank[rows] + 0.05 * torch.randn(count, bank.shape[1], generator=generator)


def assert_same_answers(actual: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    distances, indices = (part.cpu() for part in actual)
    torch.testing.assert_close(distances, expected[0], rtol=RTOL, atol=1e-5)
    agree = float((indices == expected[1]).float().mean())
    assert agree > 0.999, f"only {agree:.4f} of the neighbours agree"  # ties within float32 rounding may swap


@contextlib.contextmanager
def gpu_memory_capped() -> Iterator[None]:
    """Cap this process's GPU memory just above what it holds now: the next large ``.to("cuda")`` raises
    torch.OutOfMemoryError, as a bank larger than the GPU would."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + HEADROOM) / total)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.fixture(scope="module")
def bank_and_queries() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The bank, queries, and the CPU's answers (k=3)."""
    bank = low_rank_bank()
    queries = queries_near(bank)
    return bank, queries, MemoryBank().build(bank).search(queries, k=3)


def test_bank_on_the_gpu_answers_like_the_cpu(bank_and_queries) -> None:
    bank, queries, expected = bank_and_queries
    gpu = MemoryBank().build(bank.cuda())
    assert gpu.strategy.name in ("reference", "span")  # pruned is CPU-only
    actual = gpu.search(queries.cuda(), k=3)
    assert actual[0].is_cuda
    assert_same_answers(actual, expected)


@pytest.mark.parametrize("strategy", [ReferenceSearch, SpanSearch])
def test_bank_too_large_for_the_gpu_is_streamed_in_chunks(bank_and_queries, strategy) -> None:
    bank, queries, expected = bank_and_queries
    memory = MemoryBank().build(bank.clone(), strategy(stream_rows=STREAM_ROWS))
    with gpu_memory_capped():
        memory.to("cuda")
    held = memory.strategy.coords if strategy is ReferenceSearch else memory.strategy.frame.coords
    assert memory.features.device.type == "cpu" and held.device.type == "cpu" and held.is_pinned()
    actual = memory.search(queries.cuda(), k=3)  # each block of queries meets the bank in 40 streamed chunks
    assert actual[0].is_cuda
    assert_same_answers(actual, expected)


def test_faiss_flat_index_on_the_gpu(bank_and_queries) -> None:
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip(f"the installed faiss {faiss.__version__} has no GPU support (pip install faiss-gpu)")
    bank, queries, expected = bank_and_queries
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "this faiss has no GPU support: searching on the CPU"
        memory = MemoryBank(SearchOptions(backend="faiss", index="flat")).build(bank.cuda())
    assert "Gpu" in type(memory.strategy.index).__name__
    assert_same_answers(memory.search(queries.cuda(), k=3), expected)
