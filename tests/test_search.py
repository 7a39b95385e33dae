"""Every search strategy gives the reference's answers; choose_strategy's decisions; saved options."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from core.search import (
    FaissSearch,
    MemoryBank,
    PrunedSearch,
    ReferenceSearch,
    SearchOptions,
    SpanSearch,
    choose_strategy,
    faiss_index,
)
from core.search import pruned as pruned_module


def full_rank(num: int = 600, dim: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def low_rank(num: int = 600, rank: int = 10, dim: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num, rank, generator=generator) @ torch.randn(rank, dim, generator=generator) + 3.0


def queries_for(bank: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Near bank rows (in its span) and random ones (mostly outside a low-rank bank's span)."""
    generator = torch.Generator().manual_seed(seed)
    near = bank[:40] + 0.05 * torch.randn(40, bank.shape[1], generator=generator)
    return torch.cat([near, bank[40:50], torch.randn(60, bank.shape[1], generator=generator) * 4])


def strategies() -> list:
    made = [("span", SpanSearch)]
    if pruned_module.numba is not None:  # a narrow bound, several blocks and chunks on small banks
        made.append(("pruned", lambda: PrunedSearch(bound_width=4, query_block=16, seed_rows=64, chunk_rows=96)))
    try:
        import faiss  # noqa: F401

        made += [("faiss flat", lambda: FaissSearch("flat")),
                 ("faiss ivf, every list probed", lambda: FaissSearch("ivf", nlist=8, nprobe=8))]
    except ImportError:
        pass
    return made


@pytest.mark.parametrize("make_bank", [full_rank, low_rank], ids=["full rank", "low rank"])
@pytest.mark.parametrize(("name", "strategy"), strategies(), ids=[name for name, _ in strategies()])
@pytest.mark.parametrize("k", [1, 3])
def test_strategy_equals_the_reference(make_bank, name, strategy, k) -> None:
    features = make_bank()
    queries = queries_for(features)
    expected_distances, expected_indices = ReferenceSearch().build(features).search(queries, k)
    distances, indices = strategy().build(features).search(queries, k)
    assert torch.equal(indices, expected_indices), name
    torch.testing.assert_close(distances, expected_distances, rtol=1e-4, atol=1e-4)
    truth = torch.cdist(queries.double(), features.double()).topk(k, dim=1, largest=False)
    assert torch.equal(expected_indices, truth.indices)  # and the reference is brute force
    torch.testing.assert_close(expected_distances.double(), truth.values, rtol=1e-4, atol=1e-4)


def test_low_rank_bank_outside_queries_keep_their_residual() -> None:
    features = low_rank()
    outside = torch.randn(30, 48, generator=torch.Generator().manual_seed(3)) * 10
    span = SpanSearch().build(features)
    assert span.search_dim == 10 and span.frame.outside
    distances, _ = span.search(outside, 1)
    truth = torch.cdist(outside.double(), features.double()).min(dim=1).values
    torch.testing.assert_close(distances[:, 0].double(), truth, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- choose_strategy
def test_small_full_rank_bank_gets_the_reference() -> None:
    assert choose_strategy(full_rank(), SearchOptions()).name == "reference"


def test_small_low_rank_bank_gets_the_span_search() -> None:
    strategy = choose_strategy(low_rank(), SearchOptions())
    assert strategy.name == "span" and strategy.search_dim == 10


def test_large_bank_on_the_cpu_gets_the_pruned_search() -> None:
    if pruned_module.numba is None:
        pytest.skip("numba is not installed")
    rows = pruned_module.MIN_BANK
    strategy = choose_strategy(full_rank(rows, dim=64), SearchOptions())
    assert strategy.name == "pruned" and strategy.search_dim == 64  # all axes, rotated
    strategy = choose_strategy(low_rank(rows, rank=60, dim=96), SearchOptions())
    assert strategy.name == "pruned" and strategy.search_dim == 60  # in the span
    assert choose_strategy(low_rank(rows, rank=40, dim=96), SearchOptions()).name == "span"  # rank <= bound
    assert choose_strategy(full_rank(rows - 1, dim=64), SearchOptions()).name == "reference"  # too few rows


def test_without_numba_no_pruned_search(monkeypatch) -> None:
    monkeypatch.setattr(pruned_module, "numba", None)
    assert choose_strategy(full_rank(pruned_module.MIN_BANK, dim=64), SearchOptions()).name == "reference"


def test_faiss_backend_gets_faiss_as_configured() -> None:
    pytest.importorskip("faiss")
    assert choose_strategy(low_rank(), SearchOptions(backend="faiss")).name == "faiss-flat"
    ivf = choose_strategy(low_rank(), SearchOptions(backend="faiss", index="ivf", nlist=4, nprobe=2))
    assert ivf.name == "faiss-ivf" and ivf.nlist == 4 and ivf.search_dim == 10


def test_bank_records_its_strategy() -> None:
    """(A saved model is searched by the strategy it was fitted with: tests/test_patchcore.py.)"""
    assert MemoryBank().build(low_rank()).strategy.name == "span"
    assert MemoryBank().build(full_rank()).strategy.name == "reference"


# ----------------------------------------------------------------------------- saved options
def test_options_module_is_a_leaf() -> None:
    """The bank reads the options, never the other way round (no import cycle, not even a lazy one)."""
    import ast

    import core.search.options as options

    tree = ast.parse(Path(options.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name and name.startswith("core.")} == {"core.search"}  # faiss_index only
    assert [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "core.search" for alias in node.names] == ["faiss_index"]


def test_options_record_round_trip() -> None:
    options = SearchOptions(nlist=7, nprobe=3)
    assert options.record() == {"backend": "exact", "index": "flat", "nlist": 7, "nprobe": 3}
    assert SearchOptions.from_record(options.record(), where="model") == options


def test_saved_faiss_options_fall_back_to_exact_without_faiss(monkeypatch, caplog) -> None:
    def missing():
        raise ImportError("no faiss")

    monkeypatch.setattr(faiss_index, "import_faiss", missing)
    with caplog.at_level(logging.WARNING):
        options = SearchOptions.from_record({"backend": "faiss", "index": "ivf", "nlist": None, "nprobe": 4}, "m/")
    assert options.backend == "exact" and options.index == "ivf"
    assert "m/ was fitted with search.backend=faiss" in caplog.text


def test_bound_width_follows_the_spectrum() -> None:
    """The bound covers BOUND_VARIANCE of the variance: the default width for a concentrated spectrum, wider
    for a spread one (the official embedding's banks), never beyond MAX_BOUND_WIDTH."""
    concentrated = torch.cat([torch.full((20,), 10.0), torch.full((500,), 0.001)]).double()
    assert pruned_module.bound_width_for(concentrated) == pruned_module.BOUND_WIDTH
    flat = torch.ones(1000).double()  # 90% of the variance needs 900 axes
    assert pruned_module.bound_width_for(flat) == pruned_module.MAX_BOUND_WIDTH
    spread = torch.ones(100).double()  # 90 axes hold 90%: 90 + the norm column
    assert pruned_module.bound_width_for(spread) == 91


def test_spread_bank_gets_a_wider_bound_and_stays_exact() -> None:
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(5000, 160, generator=generator)  # isotropic: every axis holds the same variance
    queries = torch.randn(300, 160, generator=generator)
    searched = MemoryBank().build(bank)
    from core.search.span import PrincipalAxes

    width = pruned_module.bound_width_for(PrincipalAxes.of(bank).variances)  # the sample's spectrum
    assert searched.strategy.name == "pruned" and searched.strategy.bound_width == width
    assert 130 < width < 160  # about 0.9 * 160 axes + the norm column
    distances, indices = searched.search(queries, k=3)
    expected = torch.cdist(queries.double(), bank.double()).topk(3, largest=False)
    torch.testing.assert_close(distances.double(), expected.values, rtol=1e-5, atol=1e-4)
    assert torch.equal(indices, expected.indices)
