"""Search in the bank's span: the same distances in fewer dimensions when the bank is low-rank.

A bank whose features span a subspace of lower dimension than their own (EfficientNet-Lite0's
1024-d embedding is an average-pooled copy of 152 channels, so its banks have rank 152) is
expressed in an orthonormal basis ``B`` of that span about its mean ``m``. A query ``q`` splits
into its coordinates ``(q - m) B`` and a residual outside the span, orthogonal to every bank
row: ``|q - b|^2 = |(q - m) B - (b - m) B|^2 + |residual|^2``, so the search runs in the span's
dimensions and the residual's squared length is added back as a constant per query. The span
and its principal axes (largest variance first, which the pruned search's bound relies on)
come from a sample of the bank and are checked on every row; a bank that is (nearly) full rank
gets no span and is searched in all its dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.linalg import column_mean
from core.search.reference import BLOCK_ELEMENTS, STREAM_ROWS, nearest, to_device_or_pinned

# Directions whose variance is below this fraction of the largest are numerically absent.
RANK_TOL = 1e-9
# Use the span basis only when it saves at least this fraction of the dimensions.
REDUCE_BELOW = 0.75
# The span and principal axes come from this many sampled bank rows (then checked on all rows) ...
SAMPLE_ROWS = 4096
# ... and count as the bank's span when the rows keep all but this fraction of their squared length.
SPAN_CHECK = 1e-6


@dataclass
class PrincipalAxes:
    """Mean and principal axes (columns of ``vectors``, largest variance first) of a sample of the bank."""

    mean: torch.Tensor  # [D] float32
    vectors: torch.Tensor  # [D, D] float64
    rank: int  # directions with variance above RANK_TOL of the largest
    variances: torch.Tensor  # [D] float64, along ``vectors``' columns (largest first)

    @classmethod
    def of(cls, features: torch.Tensor) -> PrincipalAxes:
        mean = column_mean(features).float()
        generator = torch.Generator().manual_seed(0)
        sample = torch.randperm(len(features), generator=generator)[:SAMPLE_ROWS].to(features.device)
        centred = features[sample].double() - mean.double()
        values, vectors = torch.linalg.eigh(centred.T @ centred)
        rank = int((values > values[-1].clamp_min(1e-30) * RANK_TOL).sum())
        return cls(mean, vectors.flip(1), rank, values.flip(0))


@dataclass
class Frame:
    """The bank in search coordinates: ``(features - mean) @ basis`` (``basis`` None: just centred).

    ``outside``: the basis spans the bank but not every query, so each query's squared length outside it
    is added to its distances."""

    mean: torch.Tensor
    basis: torch.Tensor | None  # [D, r] orthonormal, or None
    outside: bool
    coords: torch.Tensor  # [M, r]
    norms: torch.Tensor  # [M] squared lengths of coords

    @classmethod
    def span(cls, features: torch.Tensor, axes: PrincipalAxes) -> Frame | None:
        """The bank's span when it has clearly fewer dimensions than the features and holds every row."""
        if not 0 < axes.rank <= REDUCE_BELOW * features.shape[1]:
            return None
        basis = axes.vectors[:, : axes.rank].float().contiguous()
        coords, energy, kept = _transform(features, axes.mean, basis)
        if energy - kept > SPAN_CHECK * energy:  # the sample missed part of the bank
            return None
        return cls(axes.mean, basis, True, coords, (coords * coords).sum(dim=1))

    @classmethod
    def rotated(cls, features: torch.Tensor, axes: PrincipalAxes) -> Frame:
        """All dimensions, rotated to the principal axes (distances unchanged, variance first)."""
        basis = axes.vectors.float().contiguous()
        coords = _transform(features, axes.mean, basis)[0]
        return cls(axes.mean, basis, False, coords, (coords * coords).sum(dim=1))

    @classmethod
    def centred(cls, features: torch.Tensor, mean: torch.Tensor) -> Frame:
        coords = _transform(features, mean, None)[0]
        return cls(mean, None, False, coords, (coords * coords).sum(dim=1))

    @property
    def dim(self) -> int:
        return self.coords.shape[1]

    def queries(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries in search coordinates, and the squared length of their part outside the span."""
        centred = queries.to(self.mean.device, torch.float32) - self.mean
        if self.basis is None:
            return centred, None
        coords = centred @ self.basis
        if not self.outside:
            return coords, None
        residual = torch.addmm(centred, coords, self.basis.T, alpha=-1.0)  # directly: no cancellation
        return coords, (residual * residual).sum(dim=1)

    def to(self, device: torch.device) -> None:
        self.mean = self.mean.to(device)
        self.basis = None if self.basis is None else self.basis.to(device)
        self.coords, self.norms = to_device_or_pinned(device, self.coords, self.norms)


def _transform(features: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor | None,
               chunk: int = 16384) -> tuple[torch.Tensor, float, float]:
    """``(features - mean) @ basis`` block by block, with the total and the kept squared length."""
    coords = torch.empty(len(features), features.shape[1] if basis is None else basis.shape[1],
                         device=features.device)
    energy = kept = 0.0
    for start in range(0, len(features), chunk):
        centred = features[start : start + chunk] - mean
        block = centred if basis is None else centred @ basis
        coords[start : start + chunk] = block
        energy += float((centred * centred).sum())
        kept += float((block * block).sum())
    return coords, energy, kept


class SpanSearch:
    """The reference's matrix products in the bank's span (all dimensions when the bank has none)."""

    name = "span"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS, stream_rows: int = STREAM_ROWS) -> None:
        self.block_elements, self.stream_rows = block_elements, stream_rows

    def build(self, features: torch.Tensor, frame: Frame | None = None) -> SpanSearch:
        if frame is None:
            axes = PrincipalAxes.of(features)
            frame = Frame.span(features, axes) or Frame.centred(features, axes.mean)
        self.frame = frame
        return self

    @property
    def search_dim(self) -> int:
        return self.frame.dim

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords, outside = self.frame.queries(queries)
        squared, indices = nearest(self.frame.coords, self.frame.norms, coords, k, self.block_elements,
                                   self.stream_rows)
        if outside is not None:
            squared += outside[:, None]
        return squared.clamp_min_(0).sqrt_(), indices

    def to(self, device: torch.device) -> None:
        self.frame.to(device)
