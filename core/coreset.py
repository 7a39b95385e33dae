"""Memory-bank subsampling: approximate greedy k-center coreset (PatchCore §3.2).

Follows the official implementation: features are projected to ``proj_dim`` by a
fixed-seed Gaussian random projection (Johnson-Lindenstrauss), the min-distance vector
starts as every point's mean distance to ``start_points`` random points, then the point
farthest from the chosen set is added and the min distances are updated, until
``ratio`` of all patches is chosen. Distances are kept squared (same arg-max) and
updated with precomputed norms, one matrix-vector product per iteration.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def check_ratio(ratio: float) -> float:
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"coreset.ratio={ratio} must be in (0, 1] (fraction of all training patches kept)")
    return float(ratio)


def coreset_size(num_features: int, ratio: float) -> int:
    return max(1, min(num_features, int(num_features * ratio)))


def random_projection(dim: int, proj_dim: int, seed: int) -> torch.Tensor:
    """Gaussian projection matrix ``[dim, proj_dim]`` scaled to preserve distances in expectation."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, proj_dim, generator=generator) / math.sqrt(proj_dim)


def _project(features: torch.Tensor, projection: torch.Tensor | None, chunk: int = 65536) -> torch.Tensor:
    if projection is None:
        return features.float()
    projection = projection.to(features.device)
    return torch.cat([features[i : i + chunk].float() @ projection for i in range(0, len(features), chunk)])


def _squared_distances(points: torch.Tensor, norms: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    # ||x||^2 + ||c||^2 - 2 x.c in one pass over the points
    return torch.addmv(norms + centre.dot(centre), points, centre, alpha=-2.0)


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    proj_dim: int | None = 128,
    start_points: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Indices ``[M]`` (M = int(N * ratio), at least 1) of an approximate greedy k-center coreset."""
    ratio = check_ratio(ratio)
    num = len(features)
    size = coreset_size(num, ratio)
    if size >= num:
        return torch.arange(num)
    projection = None if proj_dim is None else random_projection(features.shape[1], proj_dim, seed)
    points = _project(features, projection)
    norms = (points * points).sum(dim=1)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(num, generator=generator)[: min(start_points, num)].to(points.device)
    start_distances = torch.stack(
        [_squared_distances(points, norms, points[s]).clamp_min_(0).sqrt_() for s in starts], dim=1
    )
    min_distances = start_distances.mean(dim=1).square_()  # squared, like every later update
    chosen = torch.empty(size, dtype=torch.long)
    for step in tqdm(range(size), desc="coreset", disable=not progress, mininterval=1.0, leave=False):
        index = int(torch.argmax(min_distances))
        chosen[step] = index
        torch.minimum(min_distances, _squared_distances(points, norms, points[index]), out=min_distances)
        min_distances[index] = -1.0  # never chosen twice, even among exact duplicates
    return chosen


class GreedyCoresetSampler:
    """The ``coreset`` config group's default: ``select(features) -> indices`` of the bank."""

    def __init__(self, ratio: float = 0.1, proj_dim: int | None = 128, start_points: int = 10, seed: int = 0) -> None:
        self.ratio = check_ratio(ratio)
        if proj_dim is not None and proj_dim < 1:
            raise ValueError(f"coreset.proj_dim={proj_dim} must be positive, or null to use the raw features")
        if start_points < 1:
            raise ValueError(f"coreset.start_points={start_points} must be at least 1")
        self.proj_dim = proj_dim
        self.start_points = start_points
        self.seed = seed

    def select(self, features: torch.Tensor, progress: bool = True) -> torch.Tensor:
        return greedy_coreset(features, self.ratio, self.proj_dim, self.start_points, self.seed, progress)
