"""PatchCore: fit a memory bank of nominal patch features, score test patches by nearest-neighbour distance.

``fit(loader)`` embeds every training image, keeps a coreset of the patches and builds the
memory bank; ``predict(loader)`` gives image scores (max patch score, optionally the
paper's Eq. 7 reweighting) and anomaly maps (patch scores upsampled bilinearly to the
input size and blurred with a Gaussian, sigma 4 by default).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.backbones import FeatureExtractor
from core.coreset import GreedyCoresetSampler
from core.feature_cache import FeatureCache
from core.features import PatchEmbedder
from core.io import write_json_atomic
from core.memory import DTYPES, DiskFeatures, FeatureBuffer, MemoryBank, MemoryOptions
from core.threads import single_threaded_torch

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
# Images per backbone call on a CPU: with more, the activations no longer fit in the caches and a
# forward pass costs up to 1.7x more per image (EfficientNet-Lite0 at 224 px, see README: Performance).
_CPU_BACKBONE_CHUNK = 4
# Images per scoring task when batches are scored on threads: small enough to keep every thread busy
# to the last image, large enough for the search's matrix products.
_CPU_SCORE_PIECE = 4
_TRUSTED_MODULES = ("core.", "extensions.")


class ModelMismatchError(ValueError):
    """A saved model was made with a different configuration than the one asked for."""


@dataclass
class FitReport:
    n_images: int
    n_patches: int
    bank_size: int
    extract_s: float
    coreset_s: float


@dataclass
class Predictions:
    """Per test image: score, anomaly map, and (from the loader) label, mask and identity."""

    image_scores: np.ndarray  # [N]
    maps: np.ndarray  # [N, H, W] float32
    labels: np.ndarray  # [N] int, 1 = anomalous
    masks: np.ndarray  # [N, H, W] bool (all False where no mask is known)
    has_mask: np.ndarray  # [N] bool
    paths: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """1-D Gaussian with radius int(truncate * sigma + 0.5), as scipy.ndimage.gaussian_filter."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """scipy's 'reflect' mode (d c b a | a b c d | d c b a), which torch's padding modes lack."""
    size = x.shape[dim]
    positions = torch.arange(-radius, size + radius, device=x.device) % (2 * size)
    index = torch.where(positions < size, positions, 2 * size - 1 - positions)
    return x.index_select(dim, index)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps matching scipy.ndimage.gaussian_filter(sigma)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.device)
    radius = len(kernel) // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(_symmetric_pad(x, radius, 3), kernel.view(1, 1, 1, -1))
    x = F.conv2d(_symmetric_pad(x, radius, 2), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def _images_of(batch: dict | torch.Tensor) -> torch.Tensor:
    return batch["image"] if isinstance(batch, dict) else batch


def _scored_batches(score: Callable, loader: Iterable, workers: int) -> Iterator[tuple[dict | torch.Tensor, tuple]]:
    """``(batch, score(images))`` in loader order. With ``workers > 1``, pieces of ``_CPU_SCORE_PIECE``
    images are scored at once on that many threads, each single-threaded: on a CPU this scales better than
    splitting every operation of one batch across the cores (small convolutions and the search's scans
    do not split well), pieces smaller than a batch keep every thread busy to the last image, and the
    loader reads the next images meanwhile."""
    if workers <= 1:
        for batch in loader:
            yield batch, score(_images_of(batch))
        return
    pending: deque = deque()
    queued = 0  # pieces submitted and not yet collected
    with single_threaded_torch(), ThreadPoolExecutor(workers) as pool:
        for batch in loader:
            futures = [pool.submit(score, piece) for piece in _images_of(batch).split(_CPU_SCORE_PIECE)]
            pending.append((batch, futures))
            queued += len(futures)
            while queued - len(pending[0][1]) >= workers:  # enough work behind the oldest batch
                batch, futures = pending.popleft()
                queued -= len(futures)
                yield batch, _joined(futures)
        while pending:
            batch, futures = pending.popleft()
            yield batch, _joined(futures)


def _joined(futures: list) -> tuple[torch.Tensor, torch.Tensor]:
    scores, maps = zip(*(future.result() for future in futures))
    return torch.cat(scores), torch.cat(maps)


def collect_predictions(score: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], loader: Iterable,
                        progress: bool = True, workers: int = 1) -> Predictions:
    """Run ``score(images) -> (scores, maps)`` over a test loader and gather labels, masks and paths."""
    scores, maps, labels, masks, has_mask, paths, defect_types = [], [], [], [], [], [], []
    for batch, (batch_scores, batch_maps) in tqdm(_scored_batches(score, loader, workers), desc="predict",
                                                   disable=not progress, leave=False,
                                                   total=len(loader) if hasattr(loader, "__len__") else None):
        scores.append(batch_scores.numpy())
        maps.append(batch_maps.numpy().astype(np.float32))
        size = len(batch_scores)
        labels.append(np.asarray(batch.get("label", [0] * size)))
        has_mask.append(np.asarray(batch.get("has_mask", [False] * size), dtype=bool))
        if "mask" in batch:
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
        else:
            masks.append(np.zeros_like(maps[-1], dtype=bool))
        paths.extend(batch.get("path", [""] * size))
        defect_types.extend(batch.get("defect_type", [""] * size))
    if not scores:
        raise ValueError("the test loader yielded no images")
    return Predictions(
        np.concatenate(scores), np.concatenate(maps), np.concatenate(labels).astype(int),
        np.concatenate(masks), np.concatenate(has_mask), paths, defect_types,
    )


class PatchCore:
    """The PatchCore model: extractor + patch embedder + coreset sampler + memory bank."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        embedder: PatchEmbedder | None = None,
        sampler: GreedyCoresetSampler | None = None,
        num_neighbors: int = 1,
        reweight_neighbors: int | None = None,
        blur_sigma: float = 4.0,
        device: str | torch.device = "cpu",
        progress: bool = True,
        memory: MemoryOptions | None = None,
    ) -> None:
        if num_neighbors < 1:
            raise ValueError(f"patchcore.num_neighbors={num_neighbors} must be at least 1")
        if reweight_neighbors is not None and reweight_neighbors < 1:
            raise ValueError(f"patchcore.reweight_neighbors={reweight_neighbors} must be >= 1, or null for off")
        if blur_sigma < 0:
            raise ValueError(f"patchcore.blur_sigma={blur_sigma} must be >= 0 (0 = no smoothing)")
        self.device = torch.device(device)
        self.extractor = extractor.for_inference().to(self.device)  # a BatchNorm-folded, channels-last copy
        self.embedder = embedder or PatchEmbedder()
        self.sampler = sampler or GreedyCoresetSampler()
        self.num_neighbors = num_neighbors
        self.reweight_neighbors = reweight_neighbors
        self.blur_sigma = blur_sigma
        self.progress = progress
        self.memory = memory or MemoryOptions()  # search backend, training-feature buffer, feature cache
        self.bank = self.memory.new_bank()
        self.fit_info: dict = {}
        self.grid: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.metadata: dict = {}

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``images[B,3,H,W] -> (patch features [B, h*w, D], (h, w))``."""
        return self.embedder(self._feature_maps(images))

    def _feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.input_size = tuple(images.shape[-2:])  # saved with the model, to check it on load
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        chunk = len(images) if self.device.type != "cpu" else _CPU_BACKBONE_CHUNK
        parts = [self.extractor(images[start : start + chunk]) for start in range(0, len(images), chunk)]
        return parts[0] if len(parts) == 1 else [torch.cat(layer) for layer in zip(*parts)]

    # ----------------------------------------------------------------------- fit
    def fit(self, loader: Iterable) -> FitReport:
        """Stream the training features into one preallocated buffer (or read them from the feature
        cache), subsample them, build the bank. ``self.fit_info`` records how (buffer bytes, spilled, cached)."""
        start = time.perf_counter()
        dataset = getattr(loader, "dataset", None)
        total_images = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        cache = FeatureCache(self.memory.cache_dir) if self.memory.cache_dir else None
        key = cache and cache.key(self.extractor.spec(), self.embedder.spec(), dataset, self.memory.dtype)
        hit = cache.lookup(key) if key else None
        buffer: FeatureBuffer | None = None
        if hit is not None:
            features, meta = hit
            self.grid, self.input_size = tuple(meta["grid"]), tuple(meta["input_size"])
        else:
            try:
                for batch in tqdm(loader, desc="extract (train)", disable=not self.progress, leave=False):
                    features, self.grid = self.embed(_images_of(batch))
                    if buffer is None:  # sized from the first batch: patches per image x images
                        rows = features.shape[1] * (total_images or features.shape[0])
                        buffer = (cache.writer(key, rows, features.shape[-1], DTYPES[self.memory.dtype]) if key
                                  else self.memory.new_buffer(rows, features.shape[-1], self.device))
                    buffer.append(features)
            except BaseException:
                if buffer is not None:
                    buffer.discard()  # no half-written spill or cache file left behind
                raise
            if buffer is None:
                raise ValueError("the training loader yielded no images: nothing to build a memory bank from")
            features = (cache.commit(buffer, key, {"grid": list(self.grid), "input_size": list(self.input_size)})
                        if key else buffer.view())
        if isinstance(features, DiskFeatures):
            features.device = self.device  # the sampler reads it in chunks onto the model's device
        self.fit_info = {"cached": hit is not None, "spilled": isinstance(features, DiskFeatures),
                         "buffer_bytes": len(features) * features.shape[1] * DTYPES[self.memory.dtype].itemsize}
        extract_s = time.perf_counter() - start
        start = time.perf_counter()
        indices = self.sampler.select(features, progress=self.progress)
        if isinstance(features, DiskFeatures):
            selected = features.take(indices)
        else:
            selected = features[indices.to(features.device)]
        self.bank.build(selected.to(self.device, torch.float32))
        n_patches = len(features)
        del features, selected
        if buffer is not None and not key:
            buffer.discard()  # a spill file is not kept (the cache's is)
        coreset_s = time.perf_counter() - start
        n_images = n_patches // (self.grid[0] * self.grid[1])
        return FitReport(n_images, n_patches, len(self.bank), extract_s, coreset_s)

    # ------------------------------------------------------------------- predict
    def _image_scores(self, features_at: Callable[[torch.Tensor], torch.Tensor], patch_scores: torch.Tensor
                      ) -> torch.Tensor:
        """Max patch score per image, optionally reweighted by the paper's Eq. 7 (``features_at(patches)``:
        the features of one patch per image)."""
        best_patch = patch_scores.argmax(dim=1)
        scores = patch_scores.gather(1, best_patch[:, None]).squeeze(1)
        if self.reweight_neighbors is None:
            return scores
        test_patch = features_at(best_patch)  # m_test,*
        _, nearest = self.bank.search(test_patch, k=1)  # m*
        # N_b(m*): the b nearest bank features of m* (m* itself first); weight = 1 - softmax at m*.
        _, support = self.bank.search(self.bank.features[nearest[:, 0]], k=self.reweight_neighbors)
        distances = torch.linalg.vector_norm(self.bank.features[support] - test_patch[:, None], dim=-1)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images[B,3,H,W] -> (image scores [B], anomaly maps [B, H, W])``, both on the CPU."""
        layers = self._feature_maps(images)
        batch, rows = len(images), torch.arange(len(images), device=self.device)
        if self.embedder.embed_dim is not None and sum(m.shape[1] for m in layers) < self.embedder.embed_dim:
            # the embedding pools fewer channels up to D: search with its factors (same distances, less work)
            channels, projection, (h, w) = self.embedder.factors(layers)
            distances, _ = self.bank.search_factored(channels.reshape(-1, channels.shape[-1]), projection,
                                                     k=self.num_neighbors)

            def features_at(patches: torch.Tensor) -> torch.Tensor:
                return channels[rows, patches] @ projection

        else:
            features, (h, w) = self.embedder(layers)
            distances, _ = self.bank.search(features.reshape(-1, features.shape[-1]), k=self.num_neighbors)

            def features_at(patches: torch.Tensor) -> torch.Tensor:
                return features[rows, patches]

        patch_scores = distances.mean(dim=1).reshape(batch, h * w)
        image_scores = self._image_scores(features_at, patch_scores)
        maps = F.interpolate(
            patch_scores.reshape(batch, 1, h, w), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        maps = gaussian_blur(maps.squeeze(1), self.blur_sigma)
        return image_scores.cpu(), maps.cpu()

    def predict(self, loader: Iterable) -> Predictions:
        """Scores and maps of every test image; on a CPU, ``torch.get_num_threads()`` batches at a time."""
        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        return collect_predictions(self.score, loader, self.progress, workers)

    # --------------------------------------------------------------- save / load
    def spec(self) -> dict:
        """Everything that determines the model besides the bank itself."""
        return {
            "format_version": MODEL_FORMAT_VERSION,
            "extractor": self.extractor.spec(),
            "embedder": self.embedder.spec(),
            "num_neighbors": self.num_neighbors,
            "reweight_neighbors": self.reweight_neighbors,
            "blur_sigma": self.blur_sigma,
        }

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write ``bank.pt`` and ``model.json`` (spec + caller's metadata, e.g. the run config)."""
        if len(self.bank) == 0:
            raise RuntimeError("nothing to save: fit the model first")
        directory = Path(directory)
        self.bank.save(directory / "bank.pt")
        record = {**self.spec(), "grid": list(self.grid or []), "input_size": list(self.input_size or []),
                  "bank_size": len(self.bank), "search": self.memory.search_options(),
                  "metadata": metadata if metadata is not None else self.metadata}
        write_json_atomic(directory / "model.json", record)
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected_spec: dict | None = None, device: str = "cpu",
             progress: bool = True, memory: MemoryOptions | None = None) -> PatchCore:
        """Rebuild a saved model; refuse it when ``expected_spec`` (see ``spec()``) differs. The bank is
        searched as when it was fitted (``memory.backend``, ``index``, ``nlist``, ``nprobe``, saved in
        ``model.json``) unless ``memory`` says otherwise."""
        directory = Path(directory)
        spec_file, bank_file = directory / "model.json", directory / "bank.pt"
        if not spec_file.is_file() or not bank_file.is_file():
            raise FileNotFoundError(f"{directory} is not a saved PatchCore model (needs model.json and bank.pt)")
        record = json.loads(spec_file.read_text())
        if record.get("format_version") != MODEL_FORMAT_VERSION:
            raise ModelMismatchError(
                f"{spec_file} has format version {record.get('format_version')}, this code reads "
                f"{MODEL_FORMAT_VERSION}: refit the model with this version"
            )
        if expected_spec is not None:
            saved = {key: record[key] for key in expected_spec if key in record}
            differences = {key: (saved.get(key), value) for key, value in expected_spec.items()
                           if saved.get(key) != value}
            if differences:
                lines = "; ".join(f"{key}: saved {old!r}, asked {new!r}" for key, (old, new) in differences.items())
                raise ModelMismatchError(f"saved model {directory} was made with another configuration: {lines}")
        model = cls(
            _build(record["extractor"]),
            PatchEmbedder(**record["embedder"]),
            num_neighbors=record["num_neighbors"],
            reweight_neighbors=record["reweight_neighbors"],
            blur_sigma=record["blur_sigma"],
            device=device,
            progress=progress,
            memory=memory or _saved_memory_options(record.get("search", {}), directory),
        )
        model.bank = MemoryBank.load(bank_file, **model.memory.search_options()).to(model.device)
        model.grid = tuple(record["grid"]) if record.get("grid") else None
        model.metadata = record.get("metadata", {})
        if record.get("input_size"):
            model._check_code_matches(directory, tuple(record["input_size"]))
        return model

    def _check_code_matches(self, directory: Path, input_size: tuple[int, int]) -> None:
        """The rebuilt extractor must still produce the saved bank's features on the saved grid."""
        features, grid = self.embed(torch.zeros(1, 3, *input_size))
        if features.shape[-1] != self.bank.dim or grid != self.grid:
            raise ModelMismatchError(
                f"saved model {directory} does not match this code: it now gives {features.shape[-1]}-d features "
                f"on a {grid} grid, the bank holds {self.bank.dim}-d features from a {self.grid} grid; refit it"
            )


def _saved_memory_options(search: dict, directory: Path) -> MemoryOptions:
    """The search options a model was saved with; exact search when they need faiss and it is missing
    (the same neighbours or closer ones, only slower)."""
    try:
        return MemoryOptions(**search)
    except ImportError:
        log.warning("%s was fitted with memory.backend=faiss, which is not installed here: searching it "
                    "exactly (pip install faiss-cpu to search it as it was)", directory)
        return MemoryOptions(**{**search, "backend": "exact"})


def _build(spec: dict) -> FeatureExtractor:
    """Instantiate a saved extractor spec; only classes of this project are trusted."""
    target = spec["target"]
    if not target.startswith(_TRUSTED_MODULES):
        raise ModelMismatchError(f"refusing to build {target!r}: saved extractors must come from core/ or extensions/")
    module_name, _, class_name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)(**spec["kwargs"])
    except (ImportError, AttributeError, TypeError) as error:
        raise ModelMismatchError(f"the saved extractor {target}({spec['kwargs']}) cannot be built by this code "
                                 f"({error}); refit the model with this version") from error
