"""Memory bank search equals brute force; save/load round trip."""

import torch

from core.memory import MemoryBank


def test_search_equals_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    bank_features = torch.randn(700, 24, generator=generator)
    queries = torch.randn(130, 24, generator=generator)
    distances, indices = MemoryBank(bank_features).search(queries, k=3)
    brute = torch.stack([((bank_features - q) ** 2).sum(dim=1).sqrt() for q in queries])
    expected_distances, expected_indices = torch.sort(brute, dim=1)
    assert torch.equal(indices, expected_indices[:, :3])
    torch.testing.assert_close(distances, expected_distances[:, :3], rtol=1e-4, atol=1e-4)


def test_search_blocks_give_the_same_answer(monkeypatch) -> None:
    import core.memory

    bank = MemoryBank(torch.randn(50, 8))
    queries = torch.randn(40, 8)
    whole = bank.search(queries, k=2)
    monkeypatch.setattr(core.memory, "_BLOCK_ELEMENTS", 50 * 7)  # 7 queries per block
    blocked = bank.search(queries, k=2)
    assert torch.equal(whole[1], blocked[1])
    torch.testing.assert_close(whole[0], blocked[0])


def test_exact_match_has_zero_distance_and_save_load(tmp_path) -> None:
    features = torch.randn(20, 6)
    bank = MemoryBank(features)
    distances, indices = bank.search(features[[4, 9]], k=1)
    assert indices[:, 0].tolist() == [4, 9]
    assert distances.max().item() < 1e-3
    bank.save(tmp_path / "bank.pt")
    loaded = MemoryBank.load(tmp_path / "bank.pt")
    assert torch.equal(loaded.features, bank.features)
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
