"""Greedy coreset: size, uniqueness, determinism, equality with brute force, coverage vs random."""

import pytest
import torch

from core.coreset import GreedyCoresetSampler, greedy_coreset


def brute_force_greedy(features: torch.Tensor, size: int, starts: torch.Tensor) -> list[int]:
    """Textbook approximate greedy k-center, written from the official description with cdist."""
    distances = torch.cdist(features.double(), features.double())
    current = distances[:, starts].mean(dim=1)
    chosen: list[int] = []
    for _ in range(size):
        index = int(torch.argmax(current))
        chosen.append(index)
        current = torch.minimum(current, distances[:, index])
    return chosen


def coverage_radius(features: torch.Tensor, indices: torch.Tensor) -> float:
    return torch.cdist(features, features[indices]).min(dim=1).values.max().item()


def test_size_uniqueness_and_determinism() -> None:
    features = torch.randn(500, 32, generator=torch.Generator().manual_seed(1))
    first = greedy_coreset(features, 0.1, proj_dim=8, seed=3, progress=False)
    again = greedy_coreset(features, 0.1, proj_dim=8, seed=3, progress=False)
    other = greedy_coreset(features, 0.1, proj_dim=8, seed=4, progress=False)
    assert len(first) == 50 and len(set(first.tolist())) == 50
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_equals_brute_force_without_projection() -> None:
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ours = greedy_coreset(features, 0.1, proj_dim=None, start_points=10, seed=7, progress=False)
    starts = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:10]
    assert ours.tolist() == brute_force_greedy(features, 30, starts)


def test_coverage_beats_random_on_clustered_data() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 64, generator=generator) * 10
    # very unequal cluster sizes: random sampling misses the small clusters
    sizes = [400] * 5 + [5] * 15
    features = torch.cat([c + torch.randn(n, 64, generator=generator) for c, n in zip(centres, sizes)])
    greedy = greedy_coreset(features, 0.02, proj_dim=128, seed=0, progress=False)
    random = torch.randperm(len(features), generator=generator)[: len(greedy)]
    assert coverage_radius(features, greedy) < 0.5 * coverage_radius(features, random)


def test_duplicates_are_never_chosen_twice() -> None:
    features = torch.zeros(50, 4)
    features[:5] = torch.eye(4, 4).repeat(2, 1)[:5]
    chosen = greedy_coreset(features, 0.5, proj_dim=None, progress=False)
    assert len(set(chosen.tolist())) == 25


def test_full_ratio_keeps_everything_and_tiny_ratio_keeps_one() -> None:
    features = torch.randn(40, 8)
    assert greedy_coreset(features, 1.0, progress=False).tolist() == list(range(40))
    assert len(greedy_coreset(features, 0.001, progress=False)) == 1


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_rejected(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"coreset.ratio=.*\(0, 1\]"):
        GreedyCoresetSampler(ratio=ratio)
