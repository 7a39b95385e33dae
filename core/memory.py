"""The memory bank: exact Euclidean nearest-neighbour search over the coreset features."""

from __future__ import annotations

from pathlib import Path

import torch

from core.io import atomic_write

# Bound the [queries x bank] distance block to about this many floats (256 MB).
_BLOCK_ELEMENTS = 64 * 1024 * 1024


class MemoryBank:
    """Holds ``features[M, D]`` and answers k-nearest-neighbour queries exactly.

    Distances use ||q||^2 + ||b||^2 - 2 q.b with precomputed bank norms: one matrix
    product per query block, the block size bounded so memory stays flat.
    """

    def __init__(self, features: torch.Tensor | None = None) -> None:
        self.features = torch.empty(0, 0)
        self.norms = torch.empty(0)
        if features is not None:
            self.build(features)

    def build(self, features: torch.Tensor) -> MemoryBank:
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"memory bank needs a non-empty [M, D] tensor, got shape {tuple(features.shape)}")
        self.features = features.float().contiguous()
        self.norms = (self.features * self.features).sum(dim=1)
        return self

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def to(self, device: torch.device | str) -> MemoryBank:
        self.features = self.features.to(device)
        self.norms = self.norms.to(device)
        return self

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances[Q, k], indices[Q, k])`` of the k nearest bank features, nearest first."""
        if len(self) == 0:
            raise RuntimeError("memory bank is empty: fit the model (or load a saved one) first")
        if queries.shape[-1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[-1]} does not match the bank's {self.dim}")
        k = min(k, len(self))
        queries = queries.to(self.features.device, torch.float32)
        block = max(1, _BLOCK_ELEMENTS // len(self))
        distances, indices = [], []
        for start in range(0, len(queries), block):
            chunk = queries[start : start + block]
            squared = torch.addmm(self.norms, chunk, self.features.T, alpha=-2.0)
            squared += (chunk * chunk).sum(dim=1, keepdim=True)
            best, where = torch.topk(squared, k, dim=1, largest=False)
            distances.append(best.clamp_min_(0).sqrt_())
            indices.append(where)
        return torch.cat(distances), torch.cat(indices)

    def save(self, path: str | Path) -> None:
        features = self.features.cpu()
        atomic_write(path, lambda tmp: torch.save({"features": features}, tmp))

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["features"])
