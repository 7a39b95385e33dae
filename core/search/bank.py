"""``MemoryBank``: the coreset's features and the k-nearest-neighbour search over them.

The search itself is a strategy object (``SearchStrategy``) that ``choose_strategy`` picks, in one
place, when the bank is built: all of them answer with the reference's neighbours (faiss ``ivf``
excepted, which is approximate by design).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F

from core.search import pruned
from core.search.faiss_index import FaissSearch
from core.search.options import SearchOptions
from core.search.pruned import PrunedSearch
from core.search.reference import ReferenceSearch
from core.search.span import Frame, PrincipalAxes, SpanSearch

log = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")


class SearchStrategy(Protocol):
    """A k-NN search over one bank: ``build`` prepares it, ``search`` answers nearest first."""

    name: str  # short, recorded with a saved model

    @property
    def search_dim(self) -> int: ...  # dimensions the search works in

    def build(self, features: torch.Tensor) -> SearchStrategy: ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # Euclidean

    def to(self, device: torch.device) -> None: ...


def choose_strategy(features: torch.Tensor, options: SearchOptions) -> SearchStrategy:
    """The search for this bank, built. Every exact choice gives the reference's answers; they differ in
    speed only:

    - ``faiss``: as configured, over the bank's span when it has one;
    - the pruned search: on a CPU with numba, for banks of ``pruned.MIN_BANK`` rows or more whose
      search dimension exceeds the bound's width (in the span, or all axes rotated); the width follows
      the bank's spectrum (``pruned.bound_width_for``);
    - the span search: a low-rank bank otherwise;
    - the reference: a (nearly) full-rank bank otherwise."""
    axes = PrincipalAxes.of(features)
    span = Frame.span(features, axes)  # None: the bank fills (nearly) all its dimensions
    if options.backend == "faiss":
        return FaissSearch(options.index, options.nlist, options.nprobe).build(
            features, span or Frame.centred(features, axes.mean))
    search_dim = features.shape[1] if span is None else span.dim
    width = pruned.bound_width_for(axes.variances)
    if pruned.pays_off(len(features), search_dim, features.device, width):
        return PrunedSearch(bound_width=width).build(features, span or Frame.rotated(features, axes))
    if span is not None:
        return SpanSearch().build(features, span)
    return ReferenceSearch().build(features)


class MemoryBank:
    """Holds ``features[M, D]`` (float32) and answers k-nearest-neighbour queries with its strategy.

    The bank owns its metric. ``metric="cosine"``: the rows are L2-normalised when the bank is built and
    every query when it is searched (here, and only here), so every strategy, exact as ever, ranks by
    cosine distance; the distances it answers are those between the unit vectors
    (``|a - b|^2 = 2 (1 - cos)``), which ``core.scoring`` turns into 1 - cos. The stored rows are the unit ones.
    """

    def __init__(self, options: SearchOptions | None = None, metric: str = "euclidean") -> None:
        if metric not in METRICS:
            raise ValueError(f"memory bank metric={metric!r}: choose one of {METRICS}")
        self.options = options or SearchOptions()
        self.metric = metric
        self.features = torch.empty(0, 0)
        self.strategy: SearchStrategy | None = None
        self.device = torch.device("cpu")

    def build(self, features: torch.Tensor, strategy: SearchStrategy | None = None) -> MemoryBank:
        """Keep ``features`` and prepare the search; ``strategy``: a given (unbuilt) search instead of
        ``choose_strategy``'s, for comparisons."""
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"memory bank needs a non-empty [M, D] tensor, got shape {tuple(features.shape)}")
        self.features = self._in_metric(features.float()).contiguous()
        self.device = self.features.device
        self.strategy = (choose_strategy(self.features, self.options) if strategy is None
                         else strategy.build(self.features))
        return self

    def _in_metric(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, dim=-1) if self.metric == "cosine" else vectors

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def search_dim(self) -> int:
        """Dimensions the search works in (the rank of the bank when that is lower than ``dim``)."""
        return self.strategy.search_dim

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances[Q, k], indices[Q, k])`` of the k nearest bank features, nearest first."""
        if len(self) == 0:
            raise RuntimeError("memory bank is empty: fit the model (or load a saved one) first")
        if queries.shape[-1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[-1]} does not match the bank's {self.dim}")
        if self.metric == "cosine":
            queries = self._in_metric(queries.float())
        return self.strategy.search(queries, min(k, len(self)))

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The bank's rows at ``indices`` (unit rows for cosine)."""
        return self.features[indices.to(self.features.device)]  # a bank too large for the GPU stays on the CPU

    def distances(self, queries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``queries [Q, D]``, ``indices [Q, n]`` -> the Euclidean distances ``[Q, n]`` from each query to
        those of the bank's rows, in the bank's metric (what ``search`` measures)."""
        if self.metric == "cosine":
            queries = self._in_metric(queries.float())
        return torch.linalg.vector_norm(self.rows(indices).to(queries.device) - queries[:, None], dim=-1)

    def to(self, device: torch.device | str) -> MemoryBank:
        """Move the bank; a bank too large for the GPU stays in CPU memory and is streamed in chunks."""
        device = torch.device(device)
        self.device = device
        if len(self) == 0:
            return self
        try:
            self.features = self.features.to(device)
        except torch.OutOfMemoryError:
            log.warning("memory bank (%d x %d) does not fit on %s: kept in CPU memory", len(self), self.dim, device)
            torch.cuda.empty_cache()
        self.strategy.to(device)
        return self
