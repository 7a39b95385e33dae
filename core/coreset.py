"""Memory-bank subsampling: approximate greedy k-center coreset (PatchCore §3.2), and two baselines.

The greedy coreset follows the official implementation: features are projected to
``proj_dim`` by a fixed-seed Gaussian random projection (Johnson-Lindenstrauss), the
min-distance vector starts as every point's mean distance to ``start_points`` random
points, then the point farthest from the chosen set is added and the min distances are
updated, until ``ratio`` of all patches is chosen. Distances are kept squared (same arg-max).

Two implementations of that same selection:

- ``plain``: one pass over all points per chosen centre (the straightforward loop, kept as
  the reference; the fastest choice on a GPU).
- ``fast`` (the CPU default): exact, with two savings.
  *Batches of centres*: while the farthest points among the current top ``K`` stay above the
  (K+1)-th largest min distance, the greedy choices among them are exactly those of the plain
  loop (every point outside the top K is already below that threshold and can only drop), so
  a whole batch of centres (typically half of K) is chosen by looking at K points only; all
  points are then updated against the batch at once, which turns a memory-bound
  matrix-vector product per centre into a compute-bound matrix product per batch.
  *Lower bounds*: in the principal-axes frame of the projected points (a rotation: the
  distances are unchanged), the squared distance over the first ``prefix`` axes is a lower
  bound of the full one; only pairs whose bound falls below the point's current min distance
  (about 0.5 % of them on real features) get their full distance computed.
  The selection equals the plain loop's up to floating-point rounding (the two compute the
  same distances in different orders, so exact near-ties can be broken differently).
  Triangle-inequality pruning by the points' nearest centres was measured too and skips
  little on these features (most centres lie within twice a point's radius in 128-d), so it
  is not used.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from tqdm.auto import tqdm

from core.linalg import FASTMATH, TOL, column_mean, squared_norms
from core.threads import single_threaded_torch

try:  # optional: fuses the bound check and the refinement of the fast coreset (about 2x faster)
    import numba
except ImportError:  # pragma: no cover - exercised by the torch fallback test
    numba = None

METHODS = ("auto", "fast", "plain")
_CANDIDATES = 2048  # K: points looked at to choose one batch of centres
_PREFIX = 32  # principal axes in the lower bound
_ROWS = 2048  # points per block when updating against a batch


class FeatureRows(Protocol):
    """What the samplers read: ``[N, D]`` rows in slices (a tensor, or ``core.storage.TrainingFeatures``,
    which may live in a file). ``device``: where the selection computes."""

    shape: tuple[int, ...]
    device: torch.device

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


class Sampler(Protocol):
    """Chooses the memory bank's rows among the training features."""

    def select(self, features: FeatureRows, progress: bool = True) -> torch.Tensor: ...  # indices [M]


def check_ratio(ratio: float) -> float:
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"coreset.ratio={ratio} must be in (0, 1] (fraction of all training patches kept)")
    return float(ratio)


def coreset_size(num_features: int, ratio: float) -> int:
    return max(1, min(num_features, int(num_features * ratio)))


PROJECTIONS = ("gaussian", "linear")


def random_projection(dim: int, proj_dim: int, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """Seeded projection matrix ``[dim, proj_dim]``. ``gaussian``: N(0, 1/proj_dim) entries, which preserve
    distances in expectation (Johnson-Lindenstrauss). ``linear``: the official code's projection, a
    bias-free ``nn.Linear`` with torch's default init, i.e. U(-1/sqrt(dim), 1/sqrt(dim)) entries (distances
    shrink by a constant factor, which changes no greedy choice); drawn from our seeded generator, not
    torch's global RNG as the official code does."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "linear":
        bound = 1.0 / math.sqrt(dim)
        return torch.empty(dim, proj_dim).uniform_(-bound, bound, generator=generator)
    return torch.randn(dim, proj_dim, generator=generator) / math.sqrt(proj_dim)


def project(features: FeatureRows, projection: torch.Tensor | None, chunk: int = 16384) -> torch.Tensor:
    """``[N, P]`` float32 in a new tensor, read ``chunk`` rows at a time (``features`` may live on disk)."""
    num, dim = len(features), features.shape[1]
    out_dim = dim if projection is None else projection.shape[1]
    device = features.device
    out = torch.empty(num, out_dim, device=device)
    if projection is not None:
        projection = projection.to(device)
    for i in range(0, num, chunk):
        block = features[i : i + chunk].to(device, torch.float32)
        out[i : i + chunk] = block if projection is None else block @ projection
    return out


def squared_distances(points: torch.Tensor, norms: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    # ||x||^2 + ||c||^2 - 2 x.c in one pass over the points
    return torch.addmv(norms + centre.dot(centre), points, centre, alpha=-2.0)


def greedy_coreset(
    features: FeatureRows,
    ratio: float,
    proj_dim: int | None = 128,
    start_points: int = 10,
    seed: int = 0,
    progress: bool = True,
    method: str = "auto",
    projection: str = "gaussian",
) -> torch.Tensor:
    """Indices ``[M]`` (M = int(N * ratio), at least 1) of an approximate greedy k-center coreset.

    ``features`` is a ``[N, D]`` tensor (any float dtype, CPU or CUDA) or any ``FeatureRows`` (a buffer
    on disk): it is read in chunks. ``method``: ``fast`` | ``plain`` | ``auto`` (fast on the CPU, plain on
    a GPU).
    """
    ratio = check_ratio(ratio)
    if method not in METHODS:
        raise ValueError(f"coreset.method={method!r}: choose one of {METHODS}")
    num = len(features)
    size = coreset_size(num, ratio)
    if size >= num:
        return torch.arange(num)
    points, norms, min_distances = starting_state(features, proj_dim, start_points, seed, projection)
    if method == "plain" or (method == "auto" and points.is_cuda):
        return plain_loop(points, norms, min_distances, size, progress)
    del norms
    return _batched_loop(_principal_frame(points), min_distances, size, progress).cpu()


def starting_state(features: FeatureRows, proj_dim: int | None, start_points: int, seed: int,
                   projection_kind: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projected points, their squared norms and the squared min-distance vector both loops start
    from: every point's mean distance to ``start_points`` seeded random points, squared."""
    num = len(features)
    projection = (None if proj_dim is None
                  else random_projection(features.shape[1], proj_dim, seed, projection_kind))
    points = project(features, projection)
    norms = squared_norms(points)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(num, generator=generator)[: min(start_points, num)].to(points.device)
    start_distances = torch.stack(
        [squared_distances(points, norms, points[s]).clamp_min_(0).sqrt_() for s in starts], dim=1
    )
    return points, norms, start_distances.mean(dim=1).square_()  # squared, like every later update


def plain_loop(points: torch.Tensor, norms: torch.Tensor, min_distances: torch.Tensor, size: int,
               progress: bool) -> torch.Tensor:
    """The reference: one addmv over all points per chosen centre."""
    chosen = torch.empty(size, dtype=torch.long)
    for step in tqdm(range(size), desc="coreset", disable=not progress, mininterval=1.0, leave=False):
        index = int(torch.argmax(min_distances))
        chosen[step] = index
        torch.minimum(min_distances, squared_distances(points, norms, points[index]), out=min_distances)
        min_distances[index] = -1.0  # never chosen twice, even among exact duplicates
    return chosen


def _principal_frame(points: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Rotate (in place) to the principal axes about the mean: distances unchanged, variance first."""
    mean = column_mean(points, chunk)
    covariance = torch.zeros(points.shape[1], points.shape[1], dtype=torch.float64, device=points.device)
    for i in range(0, len(points), chunk):
        block = points[i : i + chunk].double() - mean
        covariance += block.T @ block
    _, vectors = torch.linalg.eigh(covariance)
    rotation = vectors.flip(1).float()  # largest variance first
    mean = mean.float()
    for i in range(0, len(points), chunk):
        points[i : i + chunk] = (points[i : i + chunk] - mean) @ rotation
    return points


def _batched_loop(points: torch.Tensor, min_distances: torch.Tensor, size: int, progress: bool) -> torch.Tensor:
    """Exact greedy selection, a batch of centres at a time (see the module docstring).

    Torch runs single-threaded inside (thousands of small steps: on a busy machine a second
    OpenMP thread that is not scheduled makes every step wait; docs/performance.md has the
    figure); the update against each batch is split over ``torch.get_num_threads()`` Python
    threads instead, block by block, so a slow core only delays its own blocks (the thread
    budget: ``core.threads``).
    """
    threads = torch.get_num_threads()
    prefix = points[:, : min(_PREFIX, points.shape[1])]
    prefix_norms = squared_norms(prefix)
    chosen = torch.empty(size, dtype=torch.long, device=points.device)
    filled = 0
    pool = ThreadPoolExecutor(threads) if threads > 1 and not points.is_cuda else None
    try:
        with single_threaded_torch(), tqdm(total=size, desc="coreset", disable=not progress, mininterval=1.0,
                                           leave=False) as bar:
            while filled < size:
                start = filled
                filled = _choose_batch(points, min_distances, chosen, filled)
                if filled == start:  # an exact tie at the threshold: one step of the plain loop
                    index = int(torch.argmax(min_distances))
                    chosen[filled] = index
                    filled += 1
                    distances = (points - points[index]).square_().sum(dim=1)
                    torch.minimum(min_distances, distances, out=min_distances)
                    min_distances[index] = -1.0
                elif filled < size:
                    min_distances[chosen[start:filled]] = -1.0
                    _update(points, prefix, prefix_norms, min_distances, chosen[start:filled], pool)
                bar.update(filled - start)
    finally:
        if pool is not None:
            pool.shutdown()
    return chosen


def _choose_batch(points: torch.Tensor, min_distances: torch.Tensor, chosen: torch.Tensor, filled: int) -> int:
    """Greedy steps among the top-K points while their best stays strictly above everyone else's value."""
    num = len(points)
    if num <= _CANDIDATES:
        top, threshold = torch.arange(num, device=points.device), -0.5  # every point: the plain loop
    else:
        values, top = torch.topk(min_distances, _CANDIDATES + 1)
        threshold = float(values[-1])
        top = torch.sort(top[:-1]).values  # index order: ties break towards the lowest index, like argmax
    values = min_distances[top]
    candidates = points[top]
    size = len(chosen)
    while filled < size:
        best = int(torch.argmax(values))
        if not float(values[best]) > threshold:
            break
        chosen[filled] = top[best]
        filled += 1
        torch.minimum(values, (candidates - candidates[best]).square_().sum(dim=1), out=values)
        values[best] = -1.0
    min_distances[top] = values  # exact for the whole batch already
    return filled


def _update(points: torch.Tensor, prefix: torch.Tensor, prefix_norms: torch.Tensor, min_distances: torch.Tensor,
            batch: torch.Tensor, pool: ThreadPoolExecutor | None = None) -> None:
    """``min_distances = min(min_distances, d(x, c) for c in batch)``, skipping pairs ruled out by the bound."""
    centres = points[batch].contiguous()
    centres_prefix = prefix[batch]
    # bound' = |x_p|^2 (1 - tol) + |c_p|^2 (1 - tol) - 2 x_p.c_p  <  r (1 + tol)  is necessary for d(x, c) < r
    centre_norms = (centres_prefix * centres_prefix).sum(dim=1) * (1 - TOL)
    centres_prefix_t = centres_prefix.T.contiguous()
    fused = numba is not None and not points.is_cuda

    def block(start: int) -> None:
        end = min(len(points), start + _ROWS)
        bounds = torch.addmm(centre_norms, prefix[start:end], centres_prefix_t, alpha=-2.0)
        if fused:
            _refine_numba(bounds.numpy(), prefix_norms.numpy(), start, points.numpy(), centres.numpy(),
                          min_distances.numpy(), TOL)
            return
        current = min_distances[start:end]
        limit = current * (1 + TOL) - prefix_norms[start:end] * (1 - TOL)
        rows, cols = (bounds < limit[:, None]).nonzero(as_tuple=True)
        if len(rows):
            distances = (points[start + rows] - centres[cols]).square_().sum(dim=1)
            current.scatter_reduce_(0, rows, distances, "amin")

    starts = range(0, len(points), _ROWS)
    if pool is None:
        for start in starts:
            block(start)
    else:  # blocks touch disjoint rows of min_distances
        for _ in pool.map(block, starts):
            pass


if numba is not None:

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=FASTMATH)
    def _refine_numba(bounds, prefix_norms, start, points, centres, min_distances, tol):  # pragma: no cover
        rows, count = bounds.shape
        dim = points.shape[1]
        for i in range(rows):
            x = start + i
            current = min_distances[x]
            limit = current * (1 + tol) - prefix_norms[x] * (1 - tol)
            for c in range(count):
                if bounds[i, c] < limit:
                    total = 0.0
                    for j in range(dim):
                        diff = points[x, j] - centres[c, j]
                        total += diff * diff
                    if total < current:
                        current = total
                        limit = current * (1 + tol) - prefix_norms[x] * (1 - tol)
            min_distances[x] = current


class GreedyCoresetSampler:
    """The ``coreset`` config group's default: ``select(features) -> indices`` of the bank."""

    def __init__(self, ratio: float = 0.1, proj_dim: int | None = 128, start_points: int = 10, seed: int = 0,
                 method: str = "auto", projection: str = "gaussian") -> None:
        self.ratio = check_ratio(ratio)
        if proj_dim is not None and proj_dim < 1:
            raise ValueError(f"coreset.proj_dim={proj_dim} must be positive, or null to use the raw features")
        if start_points < 1:
            raise ValueError(f"coreset.start_points={start_points} must be at least 1")
        if method not in METHODS:
            raise ValueError(f"coreset.method={method!r}: choose one of {METHODS}")
        if projection not in PROJECTIONS:
            raise ValueError(f"coreset.projection={projection!r}: choose one of {PROJECTIONS}")
        self.projection = projection
        self.proj_dim = proj_dim
        self.start_points = start_points
        self.seed = seed
        self.method = method

    def select(self, features: FeatureRows, progress: bool = True) -> torch.Tensor:
        return greedy_coreset(features, self.ratio, self.proj_dim, self.start_points, self.seed, progress,
                              self.method, self.projection)


class RandomSampler:
    """Baseline ``coreset=random``: a seeded uniform sample of ``ratio`` of all patches."""

    def __init__(self, ratio: float = 0.1, seed: int = 0) -> None:
        self.ratio = check_ratio(ratio)
        self.seed = seed

    def select(self, features: FeatureRows, progress: bool = True) -> torch.Tensor:
        num = len(features)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num, generator=generator)[: coreset_size(num, self.ratio)].sort().values


class AllPatchesSampler:
    """Baseline ``coreset=none``: every patch goes into the bank (``ratio`` is fixed at 1)."""

    def __init__(self, ratio: float = 1.0) -> None:
        if float(ratio) != 1.0:
            raise ValueError(f"coreset=none keeps every patch: coreset.ratio={ratio} must be 1.0 "
                             "(use coreset=random or coreset=greedy to subsample)")
        self.ratio = 1.0

    def select(self, features: FeatureRows, progress: bool = True) -> torch.Tensor:
        return torch.arange(len(features))
