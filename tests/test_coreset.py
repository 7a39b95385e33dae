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


# --------------------------------------------------------------------------- fast selection and baselines
import core.coreset as coreset_module  # noqa: E402
from core.coreset import AllPatchesSampler, RandomSampler  # noqa: E402


def clustered(num: int, dim: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, dim, generator=generator) * 4
    labels = torch.randint(0, 30, (num,), generator=generator)
    return centres[labels] + torch.randn(num, dim, generator=generator)


@pytest.fixture(params=["numba", "torch"])
def small_batches(request, monkeypatch):
    """Batches, blocks and the bound's prefix far smaller than the data, through both refinement paths."""
    monkeypatch.setattr(coreset_module, "_CANDIDATES", 128)
    monkeypatch.setattr(coreset_module, "_ROWS", 333)
    monkeypatch.setattr(coreset_module, "_PREFIX", 6)
    if request.param == "torch":
        monkeypatch.setattr(coreset_module, "numba", None)
    elif coreset_module.numba is None:
        pytest.skip("numba is not installed")
    return request.param


def test_fast_equals_plain_loop_over_many_batches(small_batches) -> None:
    features = clustered(4000)
    plain = greedy_coreset(features, 0.1, proj_dim=32, seed=2, progress=False, method="plain")
    fast = greedy_coreset(features, 0.1, proj_dim=32, seed=2, progress=False, method="fast")
    assert fast.tolist() == plain.tolist()


def test_fast_equals_brute_force_without_projection(small_batches) -> None:
    features = clustered(1500, dim=16, seed=3)
    ours = greedy_coreset(features, 0.05, proj_dim=None, start_points=10, seed=7, progress=False, method="fast")
    starts = torch.randperm(1500, generator=torch.Generator().manual_seed(7))[:10]
    assert ours.tolist() == brute_force_greedy(features, 75, starts)


def test_fast_with_exact_duplicates_matches_plain(small_batches) -> None:
    features = clustered(150, dim=8).repeat(4, 1)  # 600 points, every one four times: ties everywhere
    plain = greedy_coreset(features, 0.5, proj_dim=None, progress=False, method="plain")
    fast = greedy_coreset(features, 0.5, proj_dim=None, progress=False, method="fast")
    assert len(set(fast.tolist())) == 300
    assert coverage_radius(features, fast) == pytest.approx(coverage_radius(features, plain), abs=1e-5)


def test_fast_does_not_modify_the_features_and_uses_all_threads(small_batches) -> None:
    features = clustered(1000, dim=16)
    copy = features.clone()
    threads = torch.get_num_threads()
    greedy_coreset(features, 0.1, proj_dim=None, progress=False, method="fast")
    assert torch.equal(features, copy)
    assert torch.get_num_threads() == threads  # restored after the single-threaded steps


def test_float16_features_give_a_coverage_within_two_percent() -> None:
    features = clustered(3000, dim=64)
    full = greedy_coreset(features, 0.1, progress=False)
    half = greedy_coreset(features.half(), 0.1, progress=False)
    assert coverage_radius(features, half) <= 1.02 * coverage_radius(features, full)


def test_unknown_method_rejected() -> None:
    with pytest.raises(ValueError, match="coreset.method"):
        GreedyCoresetSampler(method="magic")


def test_random_sampler_size_seed_and_determinism() -> None:
    features = torch.randn(1000, 4)
    first = RandomSampler(0.1, seed=0).select(features)
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert torch.equal(first, RandomSampler(0.1, seed=0).select(features))
    assert not torch.equal(first, RandomSampler(0.1, seed=1).select(features))
    assert int(first.min()) >= 0 and int(first.max()) < 1000
    with pytest.raises(ValueError, match=r"coreset.ratio"):
        RandomSampler(0.0)


def test_all_patches_sampler_keeps_everything() -> None:
    assert AllPatchesSampler().select(torch.randn(37, 3)).tolist() == list(range(37))
    with pytest.raises(ValueError, match="coreset=none keeps every patch"):
        AllPatchesSampler(ratio=0.5)


def test_full_bank_scores_lower_bound_the_coreset_scores() -> None:
    from core.search import MemoryBank

    features = clustered(2000, dim=32)
    queries = clustered(300, dim=32, seed=9) + 0.5
    full, _ = MemoryBank().build(features[AllPatchesSampler().select(features)]).search(queries)
    for sampler in (GreedyCoresetSampler(0.1, proj_dim=16), RandomSampler(0.1)):
        subset, _ = MemoryBank().build(features[sampler.select(features, progress=False)]).search(queries)
        assert bool((full <= subset + 1e-4).all())


def test_linear_projection_has_the_official_default_init() -> None:
    """The official coreset projects with a bias-free nn.Linear(dim, 128): U(-1/sqrt(dim), 1/sqrt(dim))."""
    from core.coreset import GreedyCoresetSampler, random_projection

    matrix = random_projection(400, 128, seed=0, kind="linear")
    bound = 1 / 400**0.5
    assert matrix.shape == (400, 128) and matrix.abs().max() <= bound
    assert abs(matrix.std().item() - bound / 3**0.5) < 0.02 * bound  # the std of U(-b, b) is b / sqrt(3)
    reference = torch.nn.Linear(400, 128, bias=False).weight
    assert abs(reference.std().item() - matrix.std().item()) < 0.03 * bound
    features = torch.randn(500, 400, generator=torch.Generator().manual_seed(1))
    chosen = GreedyCoresetSampler(0.1, projection="linear").select(features, progress=False)
    assert len(chosen) == 50 and len(set(chosen.tolist())) == 50
    with pytest.raises(ValueError, match="coreset.projection"):
        GreedyCoresetSampler(projection="orthogonal")
