"""The memory bank (core/search/bank.py): its search equals brute force (Euclidean and cosine, every
strategy), its rows and distances, and the strategies' knobs keep the answers."""

import pytest
import torch
import torch.nn.functional as F

from core.search import FaissSearch, MemoryBank, PrunedSearch, ReferenceSearch, SearchOptions, SpanSearch
from core.search import pruned as pruned_module
from core.storage import StorageOptions
from tests.test_search import strategies


def test_search_equals_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    bank_features = torch.randn(700, 24, generator=generator)
    queries = torch.randn(130, 24, generator=generator)
    distances, indices = MemoryBank().build(bank_features).search(queries, k=3)
    brute = torch.stack([((bank_features - q) ** 2).sum(dim=1).sqrt() for q in queries])
    expected_distances, expected_indices = torch.sort(brute, dim=1)
    assert torch.equal(indices, expected_indices[:, :3])
    torch.testing.assert_close(distances, expected_distances[:, :3], rtol=1e-4, atol=1e-4)


def test_search_blocks_give_the_same_answer() -> None:
    features = torch.randn(50, 8)
    queries = torch.randn(40, 8)
    whole = MemoryBank().build(features).search(queries, k=2)
    blocked = MemoryBank().build(features, ReferenceSearch(block_elements=50 * 7)).search(queries, k=2)  # 7 per block
    assert torch.equal(whole[1], blocked[1])
    torch.testing.assert_close(whole[0], blocked[0])


def test_exact_match_has_zero_distance() -> None:
    features = torch.randn(20, 6)
    bank = MemoryBank().build(features)
    distances, indices = bank.search(features[[4, 9]], k=1)
    assert indices[:, 0].tolist() == [4, 9]
    assert distances.max().item() < 1e-3


@pytest.mark.parametrize(("name", "strategy"), [("reference", ReferenceSearch), *strategies()],
                         ids=["reference", *[name for name, _ in strategies()]])
@pytest.mark.parametrize("k", [1, 3])
def test_cosine_search_equals_brute_force(name, strategy, k) -> None:
    """``metric="cosine"``: the bank normalises its rows and the queries; every strategy then ranks by
    1 - cos, and answers the distances between the unit vectors (d^2 / 2 = 1 - cos)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(600, 24, generator=generator) * torch.rand(600, 1, generator=generator) * 5 + 0.5
    queries = torch.randn(110, 24, generator=generator) * 3
    bank = MemoryBank(metric="cosine").build(features, strategy=strategy())
    distances, indices = bank.search(queries, k)
    cosine = 1 - F.normalize(queries.double(), dim=1) @ F.normalize(features.double(), dim=1).T
    truth = cosine.topk(k, dim=1, largest=False)
    if "ivf" not in name:  # approximate by design
        assert torch.equal(indices, truth.indices), name
    torch.testing.assert_close((distances.double() ** 2 / 2)[indices == truth.indices],
                               truth.values[indices == truth.indices], rtol=1e-4, atol=1e-5)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(600))


def test_rows_and_distances_are_in_the_banks_metric() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    euclidean, cosine = MemoryBank().build(features), MemoryBank(metric="cosine").build(features)
    indices = torch.tensor([[1, 0]])
    torch.testing.assert_close(euclidean.rows(indices), features[indices])
    torch.testing.assert_close(cosine.rows(indices), torch.tensor([[[0.0, 1.0], [0.6, 0.8]]]))
    query = torch.tensor([[0.0, 5.0]])
    torch.testing.assert_close(euclidean.distances(query, indices), torch.tensor([[3.0, 10.0 ** 0.5]]))
    torch.testing.assert_close(cosine.distances(query, indices), torch.tensor([[0.0, 0.4 ** 0.5]]))  # unit query
    with pytest.raises(ValueError, match="metric='manhattan'"):
        MemoryBank(metric="manhattan")


# --------------------------------------------------------------------------- span reduction, chunks, faiss
def low_rank(num: int, rank: int = 12, dim: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num, rank, generator=generator) @ torch.randn(rank, dim, generator=generator) + 3.0


def brute(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(queries.double(), bank.double())
    values, indices = torch.sort(distances, dim=1)
    return values[:, :k].float(), indices[:, :k]


def test_low_rank_bank_is_searched_in_its_span_with_the_same_answers() -> None:
    features = low_rank(900)
    queries = torch.cat([low_rank(50, seed=1), torch.randn(50, 64)])  # in the span, and off it
    bank = MemoryBank().build(features)
    assert bank.search_dim <= 13 < bank.dim
    distances, indices = bank.search(queries, k=4)
    expected_distances, expected_indices = brute(features, queries, 4)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances, rtol=1e-4, atol=1e-3)
    full = MemoryBank().build(features, ReferenceSearch())
    assert full.search_dim == 64
    assert torch.equal(full.search(queries, k=4)[1], indices)


@pytest.mark.parametrize("strategy", [ReferenceSearch, SpanSearch])
def test_bank_chunks_give_the_same_answer(strategy) -> None:
    features, queries = torch.randn(500, 16), torch.randn(60, 16)
    whole = MemoryBank().build(features, strategy()).search(queries, k=3)
    chunked = MemoryBank().build(features, strategy(block_elements=37 * 11, stream_rows=37))  # 14 chunks, merged
    chunked = chunked.search(queries, k=3)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[0], chunked[0])


def test_faiss_flat_and_exhaustive_ivf_equal_exact_search() -> None:
    pytest.importorskip("faiss")
    features = torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(100, 32, generator=torch.Generator().manual_seed(1))
    exact_distances, exact_indices = MemoryBank().build(features).search(queries, k=2)
    flat = MemoryBank(SearchOptions(backend="faiss", index="flat")).build(features)
    flat_distances, flat_indices = flat.search(queries, k=2)
    assert torch.equal(flat_indices, exact_indices)
    torch.testing.assert_close(flat_distances, exact_distances, rtol=1e-4, atol=1e-4)
    ivf = MemoryBank(SearchOptions(backend="faiss", index="ivf", nlist=16, nprobe=16)).build(features)  # every list
    ivf_distances, ivf_indices = ivf.search(queries, k=2)
    assert torch.equal(ivf_indices, exact_indices)
    partial = MemoryBank().build(features, FaissSearch("ivf", nlist=16, nprobe=1)).search(queries, k=1)[0]
    assert bool((partial[:, 0] >= exact_distances[:, 0] - 1e-4).all())  # approximate: never closer than exact


def test_search_and_storage_options_are_checked() -> None:
    with pytest.raises(ValueError, match="search.backend"):
        SearchOptions(backend="annoy")
    with pytest.raises(ValueError, match="search.index"):
        SearchOptions(backend="exact", index="hnsw")
    with pytest.raises(ValueError, match="storage.dtype"):
        StorageOptions(dtype="int8")


# --------------------------------------------------------------------------- the pruned search
@pytest.fixture
def pruned():
    """Bound-pruned exact search for small banks, with a bound far narrower than the search dimension,
    several query blocks (on threads), a seed region and then several streamed chunks."""
    if pruned_module.numba is None:
        pytest.skip("numba is not installed")
    return lambda: PrunedSearch(bound_width=4, query_block=9, seed_rows=64, chunk_rows=100)


@pytest.mark.parametrize("make_bank", [lambda: torch.randn(700, 24), lambda: low_rank(700, rank=16)])
def test_pruned_search_equals_brute_force(pruned, make_bank) -> None:
    features = make_bank()
    queries = torch.cat([features[:20] + 0.01, torch.randn(60, features.shape[1]) * 3])
    bank = MemoryBank().build(features, pruned())
    assert bank.strategy.name == "pruned"
    for k in (1, 3):
        distances, indices = bank.search(queries, k=k)
        expected_distances, expected_indices = brute(features, queries, k)
        assert torch.equal(indices, expected_indices)
        torch.testing.assert_close(distances, expected_distances, rtol=1e-4, atol=1e-3)
    unpruned = MemoryBank().build(features, SpanSearch())
    assert torch.equal(unpruned.search(queries, k=3)[1], bank.search(queries, k=3)[1])


def test_pruned_search_with_duplicates_and_k_above_distinct(pruned) -> None:
    features = torch.randn(10, 8).repeat(5, 1)  # 50 rows, each point five times
    bank = MemoryBank().build(features, pruned())
    distances, indices = bank.search(features[:3], k=7)
    expected = brute(features, features[:3], 7)[0]
    torch.testing.assert_close(distances, expected, rtol=1e-4, atol=1e-3)
    assert bool((indices[:, :5] % 10 == torch.arange(3)[:, None]).all())  # the five copies come first


def test_pruned_search_sends_only_far_queries_to_the_matrix_product(pruned, monkeypatch) -> None:
    features = low_rank(700, rank=16)
    near = features[:30] + 0.01  # the bound rules out almost every pair: refined in numba
    far = torch.randn(30, features.shape[1]) * 50  # the bound rules out few: one matrix product
    bank = MemoryBank().build(features, pruned())
    sent: list[int] = []
    exact = bank.strategy._nearest
    monkeypatch.setattr(bank.strategy, "_nearest", lambda coords, k: (sent.append(len(coords)), exact(coords, k))[1])
    distances, indices = bank.search(torch.cat([near, far]), k=1)
    expected_distances, expected_indices = brute(features, torch.cat([near, far]), 1)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances, rtol=1e-4, atol=1e-3)
    assert sent and 0 < sum(sent) <= 30  # some far queries, and no near one, took the fallback
