"""Small linear-algebra helpers shared by the coreset and the nearest-neighbour search."""

from __future__ import annotations

import torch

# Relative slack that keeps a float32 lower bound conservative (the coreset's and the pruned search's
# bounds are compared against float32 distances computed in another order).
TOL = 1e-5
# numba fastmath flags for the compiled kernels: no "nnan"/"ninf", the kernels compare against inf.
FASTMATH = {"reassoc", "nsz", "arcp", "contract"}


def column_mean(points: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Float64 mean of the rows, a chunk at a time: torch's ``mean(dtype=float64)`` casts the whole tensor
    first (4 GB for the projected features of 5,000 training images)."""
    return sum(block.double().sum(dim=0) for block in points.split(chunk)) / len(points)


def squared_norms(points: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Row-wise squared norms, a chunk of rows at a time: ``(points * points).sum(1)`` would hold a second
    copy of the points (2 GB for 5,000 training images)."""
    return torch.cat([(block * block).sum(dim=1) for block in points.split(chunk)])
