"""Per-patch embeddings from a list of feature maps (PatchCore §3.1), in two named variants.

``aggregation="official"`` is the official code's ``PatchCore._embed`` (tests/test_official_parity.py
checks it against that code's outputs): per layer, every position's ``p x p`` neighbourhood is unfolded
(stride 1, zero padding) into ``[C, p, p]``, deeper layers' neighbourhoods are bilinearly interpolated
to the first layer's grid, each neighbourhood is flattened channel-major to ``p*p*C`` values and
``adaptive_avg_pool1d``-ed to ``embed_dim``, and the stacked layers are pooled to ``embed_dim`` once
more. ``embed_dim=None`` keeps every unfolded value: the layers' ``p*p*C`` values concatenated.

``aggregation="channel_mean"`` averages each channel over the neighbourhood first (``avg_pool2d``,
zero padding counted) and then pools channels the same way: a different embedding, kept as a
measured variant (it agrees with the official one only where ``p*p*C = p*p*embed_dim``).
``embed_dim=None`` keeps every channel.

All steps but the interpolation act on the feature axis, the interpolation on the spatial axes, so
they commute: both poolings are folded into one precomputed linear map per layer (``_LayerPooling``),
applied on each layer's own grid, and only the pooled result is interpolated — the same numbers (to
float rounding) at a fraction of the cost, since every output averages a handful of consecutive inputs.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

AGGREGATIONS = ("official", "channel_mean")


def aggregate_locally(feature_map: torch.Tensor, patch_size: int = 3) -> torch.Tensor:
    """Mean over each position's neighbourhood; keeps the grid size (odd ``patch_size``)."""
    return F.avg_pool2d(feature_map, kernel_size=patch_size, stride=1, padding=patch_size // 2)


def unfold_neighbourhoods(feature_map: torch.Tensor, patch_size: int = 3) -> torch.Tensor:
    """``[B, C, h, w] -> [B, C*p*p, h*w]``: every position's zero-padded neighbourhood, channel-major
    (value ``c*p*p + dy*p + dx``), as the official ``PatchMaker.patchify`` lays it out."""
    return F.unfold(feature_map, kernel_size=patch_size, stride=1, padding=patch_size // 2)


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


def layer_matrices(values: tuple[int, ...], dim: int) -> list[torch.Tensor]:
    """Per-layer pooling of ``values[l]`` inputs to ``dim``, then pooling of the stacked layers to ``dim``,
    as one float64 ``[values[l], dim]`` matrix per layer (the embedding is the sum of their products)."""
    joint = pooling_matrix(dim * len(values), dim)
    return [pooling_matrix(count, dim) @ joint[layer * dim : (layer + 1) * dim] for layer, count in enumerate(values)]


def embedding_matrix(channels: tuple[int, ...], dim: int) -> torch.Tensor:
    """Per-layer pooling to ``dim``, then pooling of the concatenation to ``dim``: ``[sum(channels), dim]``."""
    per_layer = torch.block_diag(*[pooling_matrix(count, dim) for count in channels])
    return per_layer @ pooling_matrix(dim * len(channels), dim)


def _to_sparse_csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sparse @ dense is stable
        warnings.simplefilter("ignore", UserWarning)
        return dense.contiguous().to_sparse_csr()


class _LayerPooling:
    """One layer's share of the official embedding, ``[B, C, h, w] -> [B, outputs, h, w]`` on the layer's own
    grid: only the embedding columns the layer feeds (with two layers, each feeds one half), and which
    columns they are.

    Every output averages a run of consecutive channel-major values, so it reads at most ``span``
    adjacent channels. Two exact ways to apply it, chosen by work done (measured on a CPU, batch 8):
    - wide layers (``outputs * span <= 2 * C``, e.g. WRN50: 512 or 1024 channels): gather each output's
      ``span`` channels and run one grouped ``p x p`` convolution (one group per output) — no unfold,
      ~4x faster than the sparse product there;
    - narrow layers (EfficientNet-Lite0: 40 and 112 channels feed 512 outputs each, the gather would copy
      each channel ~10-25 times): unfold the neighbourhoods and multiply by the sparse (CSR) matrix.
    """

    def __init__(self, matrix: torch.Tensor, channels: int, patch_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        columns = matrix.abs().sum(dim=0).nonzero().squeeze(1)
        self.columns = columns.to(device)
        self.contiguous = bool(len(columns)) and int(columns[-1] - columns[0]) + 1 == len(columns)
        self.first = int(columns[0]) if len(columns) else 0
        self.patch_size = patch_size
        used = matrix[:, columns]  # [p*p*C, outputs]
        area = patch_size**2
        channel_of = (torch.arange(len(used)) // area)[:, None].expand_as(used)
        nonzero = used != 0
        low = torch.where(nonzero, channel_of, channels).min(dim=0).values
        span = int((torch.where(nonzero, channel_of, -1).max(dim=0).values - low).max()) + 1
        self.grouped = len(columns) * span <= 2 * channels
        if self.grouped:
            gathered = (low[:, None] + torch.arange(span)).clamp(max=channels - 1)  # [outputs, span]
            rows = gathered[:, :, None] * area + torch.arange(area)  # [outputs, span, p*p]
            weights = used.T.gather(1, rows.reshape(len(columns), -1)).reshape(rows.shape)
            weights = torch.where((low[:, None] + torch.arange(span) < channels)[:, :, None], weights, 0.0)
            self.gather = gathered.reshape(-1).to(device)
            self.weights = weights.reshape(len(columns), span, patch_size, patch_size).to(dtype).to(device)
        else:
            self.weights = _to_sparse_csr(used.T.to(dtype).to(device))

    def __call__(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            return F.conv2d(feature_map.index_select(1, self.gather), self.weights, padding=self.patch_size // 2,
                            groups=len(self.weights))
        unfolded = unfold_neighbourhoods(feature_map, self.patch_size)
        pooled = torch.stack([torch.sparse.mm(self.weights, image) for image in unfolded])
        return pooled.unflatten(2, feature_map.shape[-2:])

    def add_into(self, embedding: torch.Tensor, pooled: torch.Tensor) -> None:
        """``embedding[:, columns] += pooled`` (a slice when the columns are one run, as they are for
        the usual layouts)."""
        if self.contiguous:
            embedding[:, self.first : self.first + len(self.columns)] += pooled
        else:
            embedding.index_add_(1, self.columns, pooled)


class PatchEmbedder:
    """``list[maps] -> (Tensor[B, h*w, D], (h, w))``, maps shallow first; ``embed_dim=None`` pools nothing
    (see the module docstring for what each ``aggregation`` keeps then)."""

    def __init__(self, embed_dim: int | None = 1024, patch_size: int = 3, aggregation: str = "official") -> None:
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patchcore.embedder.patch_size={patch_size} must be a positive odd number (paper: 3)")
        if embed_dim is not None and embed_dim < 1:
            raise ValueError(f"patchcore.embedder.embed_dim={embed_dim} must be positive, or null to keep all channels")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"patchcore.embedder.aggregation={aggregation!r}: choose one of {AGGREGATIONS}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.aggregation = aggregation
        self._projections: dict[tuple, object] = {}

    def spec(self) -> dict:
        return {"embed_dim": self.embed_dim, "patch_size": self.patch_size, "aggregation": self.aggregation}

    @classmethod
    def from_spec(cls, spec: dict) -> PatchEmbedder:
        """Rebuild from ``spec()``; models saved before ``aggregation`` existed used ``channel_mean``."""
        return cls(spec["embed_dim"], spec["patch_size"], spec.get("aggregation", "channel_mean"))

    def __call__(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = tuple(feature_maps[0].shape[-2:])
        if self.aggregation == "official":
            return self._official(feature_maps, grid), grid
        return self._channel_mean(feature_maps, grid), grid

    def _key(self, feature_maps: list[torch.Tensor]) -> tuple:
        like = feature_maps[0]
        return (tuple(m.shape[1] for m in feature_maps), like.dtype, like.device)

    # ------------------------------------------------------------------ official
    def _official(self, feature_maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        if self.embed_dim is None:
            unfolded = [unfold_neighbourhoods(m, self.patch_size).unflatten(2, m.shape[-2:]) for m in feature_maps]
            return torch.cat([align_to_grid(u, grid) for u in unfolded], dim=1).flatten(2).transpose(1, 2).contiguous()
        like = feature_maps[0]
        embedding = like.new_zeros(len(like), self.embed_dim, *grid)
        for layer, feature_map in zip(self._official_layers(feature_maps), feature_maps):
            layer.add_into(embedding, align_to_grid(layer(feature_map), grid))  # pooled on the layer's own grid
        return embedding.flatten(2).transpose(1, 2).contiguous()

    def _official_layers(self, feature_maps: list[torch.Tensor]) -> list[_LayerPooling]:
        key = ("official", *self._key(feature_maps))
        if key not in self._projections:
            values = tuple(self.patch_size**2 * count for count in key[1])
            matrices = layer_matrices(values, self.embed_dim)
            self._projections[key] = [_LayerPooling(matrix, count, self.patch_size, key[2], key[3])
                                      for matrix, count in zip(matrices, key[1])]
        return self._projections[key]

    # -------------------------------------------------------------- channel_mean
    def _channel_mean(self, feature_maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        aligned = [align_to_grid(aggregate_locally(m, self.patch_size), grid) for m in feature_maps]
        channels = torch.cat(aligned, dim=1).flatten(2).transpose(1, 2)  # [B, h*w, sum C]
        if self.embed_dim is None:
            return channels.contiguous()
        sparse = self._channel_projection(feature_maps)
        embedding = torch.stack([torch.sparse.mm(sparse, image.T) for image in channels])  # [B, D, h*w]
        return embedding.transpose(1, 2).contiguous()

    def _channel_projection(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """The sparse (CSR) ``[embed_dim, sum C]`` pooling matrix for these maps' layout, built once."""
        key = ("channel_mean", *self._key(feature_maps))
        if key not in self._projections:
            dense = embedding_matrix(key[1], self.embed_dim).to(key[2]).to(key[3])
            self._projections[key] = _to_sparse_csr(dense.T)
        return self._projections[key]
