"""Per-patch embeddings from a list of feature maps (PatchCore §3.1, official-code conventions).

Each layer's map is averaged over every position's ``patch_size`` x ``patch_size``
neighbourhood (stride 1, zero padding counted, like ``nn.AvgPool2d(3, 1, 1)``), deeper
maps are brought to the first map's grid by bilinear interpolation, every layer is
reduced to ``embed_dim`` channels by adaptive average pooling over channels, and the
concatenation is pooled to ``embed_dim`` once more.

Both poolings are linear maps over channels, so they are applied as one precomputed
sparse ``[embed_dim, sum of channels]`` matrix: the same numbers as running
``adaptive_avg_pool1d`` twice (to float rounding) at a fraction of the cost, since the
pooled vector is several times wider than the channels it is made of.
"""

from __future__ import annotations

import warnings

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


def pooling_matrix(in_dim: int, out_dim: int) -> torch.Tensor:
    """``adaptive_avg_pool1d(in_dim -> out_dim)`` as a float64 ``[in_dim, out_dim]`` matrix: output ``j``
    averages inputs ``floor(j * in / out)`` to ``ceil((j + 1) * in / out)`` (exclusive)."""
    matrix = torch.zeros(in_dim, out_dim, dtype=torch.float64)
    for j in range(out_dim):
        start, end = (j * in_dim) // out_dim, -(-((j + 1) * in_dim) // out_dim)
        matrix[start:end, j] = 1.0 / (end - start)
    return matrix


def embedding_matrix(channels: tuple[int, ...], dim: int) -> torch.Tensor:
    """Per-layer pooling to ``dim``, then pooling of the concatenation to ``dim``: ``[sum(channels), dim]``."""
    per_layer = torch.block_diag(*[pooling_matrix(count, dim) for count in channels])
    return per_layer @ pooling_matrix(dim * len(channels), dim)


class PatchEmbedder:
    """``list[maps] -> (Tensor[B, h*w, D], (h, w))``; ``embed_dim=None`` keeps every channel."""

    def __init__(self, embed_dim: int | None = 1024, patch_size: int = 3) -> None:
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patchcore.patch_size={patch_size} must be a positive odd number (paper: 3)")
        if embed_dim is not None and embed_dim < 1:
            raise ValueError(f"patchcore.embed_dim={embed_dim} must be positive, or null to keep all channels")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self._projections: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def spec(self) -> dict:
        return {"embed_dim": self.embed_dim, "patch_size": self.patch_size}

    def _projection(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooling matrix for these maps' layout, built once: sparse (CSR) ``[embed_dim, sum C]`` for
        the embedding, dense ``[sum C, embed_dim]`` for ``factors``."""
        like = feature_maps[0]
        key = (tuple(m.shape[1] for m in feature_maps), like.dtype, like.device)
        if key not in self._projections:
            dense = embedding_matrix(key[0], self.embed_dim).to(like.dtype).to(like.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": sparse @ dense is stable
                warnings.simplefilter("ignore", UserWarning)
                self._projections[key] = (dense.T.contiguous().to_sparse_csr(), dense)
        return self._projections[key]

    def factors(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """``(channels [B, h*w, sum C], projection [sum C, D] or None, (h, w))``: the embedding is
        ``channels @ projection`` (``channels`` itself with ``embed_dim=None``). A search can use the
        factors directly when ``sum C < D`` (``MemoryBank.search_factored``)."""
        grid = tuple(feature_maps[0].shape[-2:])
        aligned = [align_to_grid(aggregate_locally(m, self.patch_size), grid) for m in feature_maps]
        channels = torch.cat(aligned, dim=1).flatten(2).transpose(1, 2)  # [B, h*w, sum C]
        if self.embed_dim is None:
            return channels.contiguous(), None, grid
        return channels, self._projection(feature_maps)[1], grid

    def __call__(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        channels, projection, grid = self.factors(feature_maps)
        if projection is None:
            return channels, grid
        sparse = self._projection(feature_maps)[0]
        embedding = torch.stack([torch.sparse.mm(sparse, image.T) for image in channels])  # [B, D, h*w]
        return embedding.transpose(1, 2).contiguous(), grid
