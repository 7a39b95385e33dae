"""``ExportablePatchCore``: a fitted PatchCore as one traceable ``nn.Module``, images in, scores and maps out.

``PatchCore.score`` runs sparse products, numba kernels or faiss, none of which an ONNX or OpenVINO
graph can hold. This module re-expresses the same computation with plain dense operators:

- the official embedding's pooling is a linear map per layer (``core.features``), i.e. a ``p x p``
  convolution: the grouped one ``PatchEmbedder`` itself runs for wide layers, a dense one otherwise;
- the search is the reference search (``core.search.reference``) over the centred bank, in fixed-size
  chunks of bank rows with a running best, so no tensor holds more than ``chunk x patches`` distances
  whatever the bank's size (an unchunked ``patches x bank`` matrix is what made anomalib's export ask
  for hundreds of GB); the distances of the neighbours found are recomputed from the differences, as
  the reference does;
- the rest (patch scores, image score with Eq. 7 or top percent, bilinear upsampling, blur) is the
  model's own scoring head (``core.scoring.ScoringHead``), run over ``ChunkedNearest`` instead of the
  memory bank: the same code, not a copy.

``ExportableFeatures`` is the graph up to the patch features (the fast form's graph: ``core.export.fast``
runs the suite's own search and scoring head after it); ``ExportablePatchCore`` the whole of it.

tests/test_export.py checks its outputs against ``PatchCore.score`` in torch, ONNX Runtime and OpenVINO.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.features import PatchEmbedder, _LayerPooling, embedding_matrix, layer_matrices
from core.linalg import column_mean
from core.records import check_threshold
from core.scoring import ScoringHead

# Bank rows per chunk of the search: 784 patches (one 224 px EfficientNet image) x 4096 rows is a
# 12.8 MB distance block; larger chunks are no faster on a CPU (docs/deployment.md, Export).
DEFAULT_CHUNK = 4096
INPUT_DTYPES = ("uint8", "float32")


class UnsupportedExportError(ValueError):
    """A model setting the exported graph does not implement; the message names it and what to do."""


class ExportEmbedding(nn.Module):
    """``PatchEmbedder`` with dense operators: ``list[maps] -> [B, h*w, D]`` (the same numbers to rounding)."""

    def __init__(self, embedder: PatchEmbedder, maps: list[torch.Tensor]) -> None:
        super().__init__()
        self.aggregation, self.patch_size = embedder.aggregation, embedder.patch_size
        self.grid = tuple(maps[0].shape[-2:])
        channels = [m.shape[1] for m in maps]
        dim = embedder.embed_dim
        self.grouped: list[bool] = []  # per layer: gather + grouped conv, or a dense conv
        if self.aggregation == "channel_mean":
            weight = None if dim is None else embedding_matrix(tuple(channels), dim).T.float()[:, :, None, None]
            self.register_buffer("projection", weight)
            return
        # official: one convolution per layer, producing the embedding columns that layer feeds
        area = self.patch_size**2
        if dim is None:  # every unfolded value kept: identity maps, concatenated
            matrices = [torch.eye(area * c, dtype=torch.float64) for c in channels]
            starts = [sum(area * c for c in channels[:i]) for i in range(len(channels))]
            columns = [torch.arange(s, s + area * c) for s, c in zip(starts, channels)]
            total = sum(area * c for c in channels)
        else:
            matrices, total = layer_matrices(tuple(area * c for c in channels), dim), dim
            columns = [m.abs().sum(dim=0).nonzero().squeeze(1) for m in matrices]
        for index, (matrix, count, cols) in enumerate(zip(matrices, channels, columns)):
            pooling = None if dim is None else _LayerPooling(matrix, count, self.patch_size, torch.float32,
                                                             torch.device("cpu"))
            if pooling is not None and pooling.grouped:  # as PatchEmbedder runs it: gather + grouped conv
                self.register_buffer(f"gather_{index}", pooling.gather)
                self.register_buffer(f"weight_{index}", pooling.weights)
                self.grouped.append(True)
            else:
                used = matrix if dim is None else matrix[:, cols]  # identity: all of it; else the columns fed
                weight = used.T.reshape(used.shape[1], count, self.patch_size, self.patch_size)
                self.register_buffer(f"weight_{index}", weight.float())
                self.grouped.append(False)
        order = torch.cat(columns)
        # the usual layouts: each layer feeds one run of columns, in order -> a concatenation
        self.concatenated = bool(torch.equal(order, torch.arange(total)))
        if not self.concatenated:  # general case: a 0/1 placement (summing overlaps) as a 1x1 convolution
            placement = torch.zeros(total, len(order))
            placement[order, torch.arange(len(order))] = 1.0
            self.register_buffer("placement", placement[:, :, None, None])

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if self.aggregation == "channel_mean":
            pooled = [F.avg_pool2d(m, self.patch_size, stride=1, padding=self.patch_size // 2) for m in maps]
            embedding = torch.cat([_align(m, self.grid) for m in pooled], dim=1)
            if self.projection is not None:
                embedding = F.conv2d(embedding, self.projection)
            return embedding.flatten(2).transpose(1, 2)
        parts = []
        for index, (feature_map, grouped) in enumerate(zip(maps, self.grouped)):
            weight = getattr(self, f"weight_{index}")
            if grouped:
                feature_map = feature_map.index_select(1, getattr(self, f"gather_{index}"))
            part = F.conv2d(feature_map, weight, padding=self.patch_size // 2, groups=len(weight) if grouped else 1)
            parts.append(_align(part, self.grid))
        embedding = torch.cat(parts, dim=1)
        if not self.concatenated:
            embedding = F.conv2d(embedding, self.placement)
        return embedding.flatten(2).transpose(1, 2)


def _align(feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if tuple(feature_map.shape[-2:]) == grid:
        return feature_map
    return F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)


class ChunkedNearest(nn.Module):
    """Exact k-NN over a bank in chunks of ``chunk`` rows, the ``core.scoring.NeighbourSearch`` the exported
    graph scores with: ``search(queries[Q, D], k) -> (distances[Q, k], indices[Q, k])``, nearest first,
    Euclidean as ``MemoryBank.search``'s; ``metric="cosine"``: queries are L2-normalised (the bank's rows
    are unit already), as the bank does.

    Per chunk, ``q.b - |b|^2 / 2`` (one matrix product and a precomputed bias) is maximised, which ranks as
    ``|q - b|^2 = |q|^2 + |b|^2 - 2 q.b``; the chunk's winners' squared distances are recomputed from the
    differences (the expansion loses precision for near neighbours, as ``reference.recheck`` says) and the
    best so far kept across chunks, so the largest tensor is ``Q x chunk``. The bank is centred on its mean,
    as in the reference search, and each chunk is its own constant, stored ``[D, rows]`` as the product
    reads it: no slice or transpose of the whole bank that a runtime could fold into a second copy."""

    def __init__(self, features: torch.Tensor, chunk: int = DEFAULT_CHUNK, metric: str = "euclidean") -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"export chunk={chunk} must be a positive number of bank rows")
        features = features.detach().cpu().float()
        mean = column_mean(features).float()
        self.register_buffer("mean", mean)
        self.metric = metric
        self.size, self.dim = features.shape
        self.chunk = min(chunk, self.size)
        for index, offset in enumerate(range(0, self.size, self.chunk)):
            coords = features[offset : offset + self.chunk] - mean
            self.register_buffer(f"rows_{index}", coords.T.contiguous())  # [D, rows]
            self.register_buffer(f"bias_{index}", -0.5 * (coords * coords).sum(dim=1))

    @property
    def chunks(self) -> int:
        return math.ceil(self.size / self.chunk)

    def _centred(self, queries: torch.Tensor) -> torch.Tensor:
        return (F.normalize(queries, dim=-1) if self.metric == "cosine" else queries) - self.mean

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        centred = self._centred(queries)
        k = min(k, self.size)
        best = where = None
        for index in range(self.chunks):
            rows_t, bias = getattr(self, f"rows_{index}"), getattr(self, f"bias_{index}")
            similarity = torch.matmul(centred, rows_t) + bias  # [Q, rows]
            count = min(k, rows_t.shape[1])
            if count == 1:
                part_where = similarity.argmax(dim=1, keepdim=True)
            else:
                part_where = similarity.topk(count, dim=1).indices
            part_rows = rows_t.index_select(1, part_where.reshape(-1)).T.reshape(*part_where.shape, self.dim)
            part = (part_rows - centred[:, None, :]).square().sum(dim=2)  # exact squared distances [Q, count]
            part_where = part_where + index * self.chunk
            if best is None:
                best, where = part, part_where
            elif k == 1:
                better = part < best
                best, where = torch.where(better, part, best), torch.where(better, part_where, where)
            else:
                best, order = torch.cat([best, part], dim=1).topk(k, dim=1, largest=False)
                where = torch.cat([where, part_where], dim=1).gather(1, order)
        if k > 1:  # nearest first by the exact distances (topk: the exporters have no stable sort)
            best, order = best.topk(k, dim=1, largest=False)
            where = where.gather(1, order)
        return best.sqrt(), where

    def _centred_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The centred bank rows at ``indices`` (any shape) -> ``[*indices.shape, D]``: each chunk's rows
        gathered where the index falls in that chunk (no whole-bank tensor)."""
        flat = indices.reshape(-1)
        found = None
        for index in range(self.chunks):
            rows_t = getattr(self, f"rows_{index}")
            local = flat - index * self.chunk
            part = rows_t.index_select(1, local.clamp(0, rows_t.shape[1] - 1)).T  # [n, D]
            inside = (local >= 0) & (local < rows_t.shape[1])
            found = part if found is None else torch.where(inside[:, None], part, found)
        return found.reshape(*indices.shape, self.dim)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self._centred_rows(indices) + self.mean

    def distances(self, queries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(self._centred_rows(indices) - self._centred(queries)[:, None], dim=-1)


class ExportableFeatures(nn.Module):
    """``images [N, 3, H, W]`` (uint8 0-255 or float 0-1, resized and cropped to the model's input size) ``->
    patch_features [N, h*w, D]``: normalisation, extractor, dense embedding; what ``PatchCore.embed`` gives for
    the same images normalised with the model's mean and std. The fast form's graph (the search and the scoring
    head then run in Python: ``core.export.fast``), and the first half of ``ExportablePatchCore``."""

    def __init__(self, model, input_dtype: str = "uint8") -> None:
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"export input_dtype={input_dtype!r}: choose one of {INPUT_DTYPES}")
        self.input_dtype = input_dtype
        self.input_size = tuple(model.input_size)
        self.register_buffer("mean", torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.extractor = _plain_copy(model.inference_copy)
        with torch.no_grad():
            maps = self.extractor(torch.zeros(1, 3, *self.input_size))
        self.embedding = ExportEmbedding(model.embedder, maps)

    @property
    def grid(self) -> tuple[int, int]:
        return self.embedding.grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * (1.0 / 255) if self.input_dtype == "uint8" else images.float()
        x = (x - self.mean) / self.std
        return self.embedding(self.extractor(x))  # [N, h*w, D]


class ExportablePatchCore(nn.Module):
    """``images [N, 3, H, W]`` (uint8 0-255 or float 0-1, already resized and cropped to the model's input
    size) ``-> (image_scores [N], anomaly_maps [N, H, W])``, plus ``(image_decisions [N], masks [N, H, W])``
    (bool) when ``thresholds = (image, pixel)`` are given: what ``PatchCore.score`` gives for the same
    images normalised with the model's mean and std. The single self-contained graph: ``ExportableFeatures``,
    then the chunked search and the model's scoring head."""

    def __init__(self, model, chunk: int = DEFAULT_CHUNK, input_dtype: str = "uint8",
                 thresholds: tuple[float, float | None] | None = None) -> None:
        super().__init__()
        check_exportable(model)
        self.features = ExportableFeatures(model, input_dtype)
        self.search = ChunkedNearest(model.bank.features, chunk, model.bank.metric)
        self.scoring: ScoringHead = model.scoring
        if thresholds is not None:  # the saved record's check: finite numbers (pixel: or None)
            check_threshold({"image_threshold": thresholds[0], "pixel_threshold": thresholds[1]}, "threshold")
        self.thresholds = None if thresholds is None else (float(thresholds[0]),
                                                           None if thresholds[1] is None else float(thresholds[1]))

    @property
    def input_dtype(self) -> str:
        return self.features.input_dtype

    @property
    def input_size(self) -> tuple[int, int]:
        return self.features.input_size

    @property
    def embedding(self) -> ExportEmbedding:
        return self.features.embedding

    @property
    def output_names(self) -> list[str]:
        names = ["image_scores", "anomaly_maps"]
        if self.thresholds is not None:
            names.append("image_decisions")
            if self.thresholds[1] is not None:
                names.append("anomaly_masks")
        return names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.features(images)  # [N, h*w, D]
        image_scores, maps = self.scoring.score(features, self.search, self.features.grid, self.input_size)
        outputs = (image_scores, maps)
        if self.thresholds is not None:  # a NaN or infinite score or pixel is anomalous, never nominal
            outputs += (self.scoring.anomalous(image_scores, self.thresholds[0]),)
            if self.thresholds[1] is not None:
                outputs += (self.scoring.anomalous(maps, self.thresholds[1]),)
        return outputs


def check_exportable(model) -> None:
    """Refuse, before any work, a model the graph cannot reproduce."""
    if len(model.bank) == 0:
        raise UnsupportedExportError("the model has an empty memory bank: fit it (or load a saved one) first")
    if not model.input_size:
        raise UnsupportedExportError("the model records no input size (saved before input_size existed): "
                                     "refit and save it, then export")
    if model.search.backend == "faiss" and model.search.index != "flat":
        raise UnsupportedExportError(
            f"the model searches with faiss {model.search.index!r} (approximate); the exported graph runs the exact "
            "search, whose scores differ: refit with search=exact (or faiss flat) to export")


def _plain_copy(extractor: nn.Module) -> nn.Module:
    """The inference copy (BatchNorm folded) in the default memory format, in eval mode, on the CPU."""
    import copy

    plain = copy.deepcopy(extractor).cpu().eval()
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    return plain.to(memory_format=torch.contiguous_format)
