"""The reference search: exact k-NN by blocked matrix products with precomputed bank norms.

``|q - b|^2 = |q|^2 + |b|^2 - 2 q.b``: one matrix product per block of queries and chunk of bank
rows, the k smallest per query kept, chunks merged. The bank is centred on its mean first, which
keeps ``|q|^2 + |b|^2`` small next to the distances, and the distances of the neighbours found are
recomputed from the differences (``recheck``). Every other strategy must give these answers; they
reuse ``nearest`` and ``recheck`` for the queries they hand back to a matrix product.
"""

from __future__ import annotations

import logging

import torch

from core.linalg import column_mean

log = logging.getLogger(__name__)

# Bound the [queries x bank] distance block to about this many floats.
BLOCK_ELEMENTS = 4 * 1024 * 1024
# Bank rows per chunk: bounds the distance block for very large banks, and is what is streamed to
# the compute device when the bank lives elsewhere.
STREAM_ROWS = 262144


class ReferenceSearch:
    """Blocked GEMM over the centred bank: the search a reader checks the others against."""

    name = "reference"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS, stream_rows: int = STREAM_ROWS) -> None:
        self.block_elements, self.stream_rows = block_elements, stream_rows

    def build(self, features: torch.Tensor) -> ReferenceSearch:
        self.mean = column_mean(features).float()
        self.coords = features - self.mean
        self.norms = (self.coords * self.coords).sum(dim=1)
        self.device = features.device
        return self

    @property
    def search_dim(self) -> int:
        return self.coords.shape[1]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        centred = queries.to(self.device, torch.float32) - self.mean
        squared, indices = nearest(self.coords, self.norms, centred, k, self.block_elements, self.stream_rows)
        return squared.clamp_min_(0).sqrt_(), indices

    def to(self, device: torch.device) -> None:
        self.device, self.mean = device, self.mean.to(device)
        self.coords, self.norms = to_device_or_pinned(device, self.coords, self.norms)


def nearest(points: torch.Tensor, norms: torch.Tensor, queries: torch.Tensor, k: int,
            block_elements: int = BLOCK_ELEMENTS, stream_rows: int = STREAM_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(squared distances[Q, k], indices[Q, k])`` of the k nearest ``points`` (``norms``: their squared
    lengths), on the queries' device (chunks of ``points`` are streamed there when they live elsewhere)."""
    rows = min(stream_rows, len(points))
    block = max(1, block_elements // rows)
    distances, indices = [], []
    for start in range(0, len(queries), block):
        chunk = queries[start : start + block]
        chunk_norms = (chunk * chunk).sum(dim=1, keepdim=True)
        best = where = None
        for offset in range(0, len(points), rows):
            bank = points[offset : offset + rows].to(chunk.device, non_blocking=True)
            bank_norms = norms[offset : offset + rows].to(chunk.device, non_blocking=True)
            squared = torch.addmm(bank_norms, chunk, bank.T, alpha=-2.0)
            squared += chunk_norms
            if k == 1:
                part, part_where = squared.min(dim=1, keepdim=True)
            else:
                part, part_where = torch.topk(squared, min(k, len(bank)), dim=1, largest=False)
            part_where += offset
            if best is None:
                best, where = part, part_where
            else:  # merge with the chunks seen so far
                best, order = torch.topk(torch.cat([best, part], dim=1), k, dim=1, largest=False)
                where = torch.cat([where, part_where], dim=1).gather(1, order)
        best, where = recheck(points, chunk, where)
        distances.append(best)
        indices.append(where)
    return torch.cat(distances), torch.cat(indices)


def recheck(points: torch.Tensor, queries: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances of the neighbours found, from the differences themselves (sorted, stable): the
    expansion |q|^2 + |b|^2 - 2 q.b loses precision for near neighbours (|q|^2 + |b|^2 >> d^2)."""
    valid = where.clamp_min(0)
    found = points[valid.reshape(-1).to(points.device)].to(queries.device).reshape(*where.shape, -1)
    squared = (found - queries[:, None, :]).square_().sum(dim=2).masked_fill_(where < 0, float("inf"))
    if where.shape[1] > 1:
        squared, order = torch.sort(squared, dim=1, stable=True)
        where = where.gather(1, order)
    return squared, where


def to_device_or_pinned(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` on ``device``; when they do not fit on a GPU, in pinned CPU memory instead, from where
    ``nearest`` streams them chunk by chunk."""
    try:
        return tuple(tensor.to(device) for tensor in tensors)
    except torch.OutOfMemoryError:
        log.warning("search data (%s) does not fit on %s: kept in CPU memory, streamed in chunks",
                    ", ".join(str(tuple(t.shape)) for t in tensors), device)
        torch.cuda.empty_cache()
        return tuple(tensor.cpu().pin_memory() for tensor in tensors)
