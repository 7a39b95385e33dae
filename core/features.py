"""Per-patch embeddings from a list of feature maps (PatchCore §3.1, official-code conventions).

Each layer's map is averaged over every position's ``patch_size`` x ``patch_size``
neighbourhood (stride 1, zero padding counted, like ``nn.AvgPool2d(3, 1, 1)``), deeper
maps are brought to the first map's grid by bilinear interpolation, every layer is
reduced to ``embed_dim`` channels by adaptive average pooling over channels, and the
concatenation is pooled to ``embed_dim`` once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def aggregate_locally(feature_map: torch.Tensor, patch_size: int = 3) -> torch.Tensor:
    """Mean over each position's neighbourhood; keeps the grid size (odd ``patch_size``)."""
    return F.avg_pool2d(feature_map, kernel_size=patch_size, stride=1, padding=patch_size // 2)


def align_to_grid(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (deeper, coarser) map onto the reference grid."""
    if tuple(feature_map.shape[-2:]) == tuple(size):
        return feature_map
    return F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)


def pool_channels(features: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over the last (channel) axis: ``[..., C] -> [..., dim]``."""
    leading = features.shape[:-1]
    pooled = F.adaptive_avg_pool1d(features.reshape(-1, 1, features.shape[-1]), dim)
    return pooled.reshape(*leading, dim)


class PatchEmbedder:
    """``list[maps] -> (Tensor[B, h*w, D], (h, w))``; ``embed_dim=None`` keeps every channel."""

    def __init__(self, embed_dim: int | None = 1024, patch_size: int = 3) -> None:
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patchcore.patch_size={patch_size} must be a positive odd number (paper: 3)")
        if embed_dim is not None and embed_dim < 1:
            raise ValueError(f"patchcore.embed_dim={embed_dim} must be positive, or null to keep all channels")
        self.embed_dim = embed_dim
        self.patch_size = patch_size

    def spec(self) -> dict:
        return {"embed_dim": self.embed_dim, "patch_size": self.patch_size}

    def __call__(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = tuple(feature_maps[0].shape[-2:])
        per_layer = []
        for feature_map in feature_maps:
            aligned = align_to_grid(aggregate_locally(feature_map, self.patch_size), grid)
            patches = aligned.flatten(2).transpose(1, 2)  # [B, h*w, C]
            per_layer.append(patches if self.embed_dim is None else pool_channels(patches, self.embed_dim))
        embedding = torch.cat(per_layer, dim=-1)
        if self.embed_dim is not None:
            embedding = pool_channels(embedding, self.embed_dim)
        return embedding.contiguous(), grid
