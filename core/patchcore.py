"""PatchCore (Roth et al., CVPR 2022): a memory bank of nominal patch features, and test patches
scored by the distance to their nearest neighbour in it.

``fit``: embed every training image into patch features (§3.1), keep a coreset of them (§3.2),
build the memory bank. ``score``: embed the test images and hand them to the scoring head
(``core.scoring``, §3.3): search the bank, take the patch scores' maximum as the image score
(optionally the paper's Eq. 7 reweighting) and the patch scores, upsampled and blurred, as the
anomaly map.

The collaborators hold the engineering: ``core.storage`` buffers the training features (in
memory, spilled to disk, or from the feature cache), ``core.coreset`` selects, ``core.search``
chooses and runs an exact (or faiss) nearest-neighbour strategy, ``core.scoring`` turns the
neighbours into scores and maps (the exported graph runs the same head). This file is the algorithm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.api import ImageInput, ImagePredictions, model_preprocessing, prepare_images
from core.backbones import FeatureExtractor, UntrustedSpecError
from core.coreset import GreedyCoresetSampler, Sampler
from core.data import Preprocessing
from core.detector import FitReport, Predictions, collect_predictions, images_of
from core.features import PatchEmbedder
from core.io import write_json_atomic
from core.model_files import ModelFilesError, read_bank, versions, write_folder, write_tensors
from core.saved_model import (
    BANK_FILE,
    WEIGHTS_FILE,
    load_extractor,
    preprocessing_record,
    read_record,
)
from core.scoring import ScoringHead
from core.search import MemoryBank, SearchOptions
from core.storage import EmbeddedBatch, FeatureStore, StorageOptions

log = logging.getLogger(__name__)

# 3: the scoring settings as one ``scoring`` node (2: flat keys; 2 and 3: safetensors files, the extractor's
# weights unless spec-only, a SHA-256 manifest; 1: bank.pt). Older folders are refused: refit them.
MODEL_FORMAT_VERSION = 3
# Images per backbone call on a CPU: with more, the activations no longer fit in the caches and a
# forward pass costs more per image (docs/performance.md).
_CPU_BACKBONE_CHUNK = 4


class ModelMismatchError(ValueError):
    """A saved model was made with a different configuration (or code) than the one asked for."""


class PatchCore:
    """The PatchCore detector: extractor + patch embedder + coreset sampler + memory bank + scoring head."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        embedder: PatchEmbedder | None = None,
        sampler: Sampler | None = None,
        search: SearchOptions | None = None,
        storage: StorageOptions | None = None,
        scoring: ScoringHead | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.extractor = extractor
        # The network that runs: BatchNorm folded into the convolutions, channels-last (same features).
        self.inference_copy = extractor.for_inference().to(self.device)
        self.backbone_chunk = _CPU_BACKBONE_CHUNK if self.device.type == "cpu" else None  # None: whole batches
        self.embedder = embedder or PatchEmbedder()
        self.sampler = sampler or GreedyCoresetSampler()
        self.search = search or SearchOptions()
        self.store = FeatureStore(storage or StorageOptions(), self.device)
        self.scoring = scoring or ScoringHead()
        self.bank = MemoryBank(self.search, metric=self.scoring.metric)  # cosine: the bank normalises
        self.progress = progress
        self.fit_info: dict = {}
        self.grid: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.metadata: dict = {}
        # How images become model inputs (from the fit's dataset) and the decision thresholds (given to save):
        # both saved in model.json, so predict_images needs nothing else.
        self.preprocessing: Preprocessing | None = None
        self.threshold: dict | None = None
        self._saved_extractor_spec: dict | None = None  # a self-contained load: the spec it was saved with

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.extractor.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.extractor.std

    @property
    def interpolation(self) -> str:
        return self.extractor.interpolation

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``images[B,3,H,W] -> (patch features [B, h*w, D], (h, w))`` (§3.1)."""
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        chunk = self.backbone_chunk or len(images)
        parts = [self.inference_copy(images[start : start + chunk]) for start in range(0, len(images), chunk)]
        layers = parts[0] if len(parts) == 1 else [torch.cat(layer) for layer in zip(*parts)]
        return self.embedder(layers)

    def _embedded_batches(self, loader: Iterable) -> Iterator[EmbeddedBatch]:
        for batch in tqdm(loader, desc="extract (train)", disable=not self.progress, leave=False):
            images = images_of(batch)
            features, grid = self.embed(images)
            yield EmbeddedBatch(features, grid, tuple(images.shape[-2:]))

    # ----------------------------------------------------------------------- fit
    def fit(self, loader: Iterable) -> FitReport:
        """Embed the nominal images, select a coreset of their patches, build the memory bank."""
        start = time.perf_counter()
        dataset = getattr(loader, "dataset", None)
        if isinstance(getattr(dataset, "preprocessing", None), Preprocessing):
            self.preprocessing = dataset.preprocessing
        identity = {"extractor": self.extractor.spec(), "embedder": self.embedder.spec(), "dataset": dataset}
        # on leaving the block a spill file is deleted, even on error (a cache entry is kept)
        with self.store.gather(self._embedded_batches(loader), images=_length(dataset), identity=identity) as features:
            self.grid, self.input_size, self.fit_info = features.grid, features.input_size, features.info
            extract_s = time.perf_counter() - start

            start = time.perf_counter()
            indices = self.sampler.select(features, progress=self.progress)
            self.bank.build(features.take(indices).to(self.device, torch.float32))
            n_patches = len(features)
        coreset_s = time.perf_counter() - start
        n_images = n_patches // (self.grid[0] * self.grid[1])
        return FitReport(n_images, n_patches, len(self.bank), {"extract": extract_s, "coreset": coreset_s})

    # ------------------------------------------------------------------- predict
    @torch.no_grad()
    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images[B,3,H,W] -> (image scores [B], anomaly maps [B, H, W])``, both on the CPU: the patch
        features (§3.1) searched in the bank and scored by the scoring head (§3.3)."""
        features, grid = self.embed(images)
        image_scores, maps = self.scoring.score(features, self.bank, grid, tuple(images.shape[-2:]))
        return image_scores.cpu(), maps.cpu()

    def predict(self, loader: Iterable) -> Predictions:
        """Scores and maps of every test image; on a CPU, ``torch.get_num_threads()`` pieces at a time."""
        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        return collect_predictions(self.score, loader, self.progress, workers)

    def predict_images(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 8) -> ImagePredictions:
        """Score images as a user has them (paths, numpy arrays, PIL images; any size, grey or colour) with the
        model's own preprocessing; maps and masks come back at each input's resolution, decisions and masks
        when the model was saved with thresholds (``core.api.ImagePredictions`` says how)."""
        preprocessing = model_preprocessing(self)
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        scores, maps, sizes = [], [], []
        for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not self.progress, leave=False):
            batch, batch_sizes = prepare_images(images[start : start + batch_size], self)
            batch_scores, batch_maps = self.score(batch)
            scores.append(batch_scores)
            maps.append(batch_maps)
            sizes += batch_sizes
        if not images:
            raise ValueError("predict_images got no images: pass a list of paths, numpy arrays or PIL images")
        scores = torch.cat(scores)
        bad = [i for i, finite in enumerate(torch.isfinite(scores).tolist()) if not finite]
        if bad:  # a NaN score would read as a 'nominal' decision
            raise ValueError(f"the image scores of inputs {bad} are NaN or infinite: the model or the inputs are "
                             f"broken (check them, or refit the model)")
        return ImagePredictions.from_crops(scores.numpy(), torch.cat(maps).numpy(), sizes, preprocessing,
                                           self.threshold)

    # --------------------------------------------------------------- save / load
    def spec(self) -> dict:
        """Everything that determines the model besides the bank itself."""
        return {
            "format_version": MODEL_FORMAT_VERSION,
            "extractor": self._saved_extractor_spec or self.extractor.spec(),
            "embedder": self.embedder.spec(),
            "scoring": self.scoring.record(),
        }

    def save(self, directory: str | Path, *, metadata: dict | None = None, weights: bool = True,
             threshold: dict | None = None) -> Path:
        """Write one folder: ``model.json`` (spec, preprocessing, thresholds, search settings, versions, the
        caller's metadata), ``bank.safetensors``, with ``weights`` the extractor's own ``extractor.safetensors``
        (loading then needs no weights cache; without, the weights are looked up again from the spec), and
        ``manifest.json`` (SHA-256 of each file, checked on load). Written whole or not at all."""
        if len(self.bank) == 0:
            raise RuntimeError("nothing to save: fit the model first")
        if threshold is not None:
            self.threshold = threshold
        standalone = self.extractor.standalone() if weights else None  # fails before anything is written
        record = {**self.spec(), "model": "patchcore", "grid": list(self.grid or []),
                  "input_size": list(self.input_size or []), "bank_size": len(self.bank),
                  "search": self.search.record(), "search_strategy": self.bank.strategy.name,
                  "preprocessing": preprocessing_record(self.preprocessing), "threshold": self.threshold,
                  "weights": None if standalone is None else {"file": WEIGHTS_FILE, "extractor": standalone[0]},
                  "versions": versions(), "metadata": metadata if metadata is not None else self.metadata}

        def write(folder: Path) -> None:
            write_tensors(folder / BANK_FILE, {"features": self.bank.features.float()})
            if standalone is not None:
                write_tensors(folder / WEIGHTS_FILE, standalone[1])
            write_json_atomic(folder / "model.json", record)

        return write_folder(Path(directory), write)

    @classmethod
    def load(cls, directory: str | Path, expected_spec: dict | None = None, device: str = "cpu",
             progress: bool = True, search: SearchOptions | None = None) -> PatchCore:
        """Rebuild a saved model through the constructors (which check every setting); refuse it when
        ``expected_spec`` (see ``spec()``) differs. The bank is searched as when it was fitted (the saved
        ``search`` settings) unless ``search`` says otherwise."""
        directory = Path(directory)
        try:  # files, then model.json's schema and every setting through its constructor, before any tensor
            record, parts = read_record(directory, MODEL_FORMAT_VERSION)
        except ModelFilesError as error:
            raise ModelMismatchError(str(error)) from None
        if expected_spec is not None:
            _check_expected(directory, record, expected_spec)
        extractor = _saved_extractor(directory, record)
        preprocessing = parts.pop("preprocessing")
        parts["search"] = search or parts["search"]
        model = cls(extractor, device=device, progress=progress, **parts)
        try:
            model.bank.build(read_bank(directory / BANK_FILE))
        except ValueError as error:  # an unreadable or non-finite bank
            raise ModelMismatchError(f"saved model {directory} is not valid: {error}; refit it") from None
        if len(model.bank) != record["bank_size"]:
            raise ModelMismatchError(f"saved model {directory} is not valid: {BANK_FILE} holds {len(model.bank)} "
                                     f"rows, model.json says bank_size={record['bank_size']}; refit it")
        model.bank.to(model.device)
        model.preprocessing, model.threshold = preprocessing, record.get("threshold")
        model.grid = tuple(record["grid"]) if record["grid"] else None
        model.input_size = tuple(record["input_size"]) if record["input_size"] else None
        model.metadata = record.get("metadata", {})
        if record["weights"]:
            model._saved_extractor_spec = record["extractor"]
        if model.input_size:
            model._check_code_matches(directory)
        return model

    def _check_code_matches(self, directory: Path) -> None:
        """The rebuilt extractor must still produce the saved bank's features on the saved grid."""
        features, grid = self.embed(torch.zeros(1, 3, *self.input_size))
        if features.shape[-1] != self.bank.dim or grid != self.grid:
            raise ModelMismatchError(
                f"saved model {directory} does not match this code: it now gives {features.shape[-1]}-d features "
                f"on a {grid} grid, the bank holds {self.bank.dim}-d features from a {self.grid} grid; refit it"
            )


def _length(dataset) -> int | None:
    return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None


def _saved_extractor(directory: Path, record: dict) -> FeatureExtractor:
    """The saved model's extractor, or a ``ModelMismatchError`` saying why it cannot be rebuilt."""
    try:
        return load_extractor(directory, record)
    except (UntrustedSpecError, TypeError) as error:
        raise ModelMismatchError(f"saved model {directory} is not valid: its extractor cannot be built by this "
                                 f"code ({error}); refit it") from None
    except ModelFilesError as error:  # weights missing from the file or not fitting the network
        raise ModelMismatchError(f"saved model {directory} is not valid: {error}; refit it") from None


def _check_expected(directory: Path, record: dict, expected_spec: dict) -> None:
    saved = {key: record[key] for key in expected_spec if key in record}
    differences = {key: (saved.get(key), value) for key, value in expected_spec.items() if saved.get(key) != value}
    if differences:
        lines = "; ".join(f"{key}: saved {old!r}, asked {new!r}" for key, (old, new) in differences.items())
        raise ModelMismatchError(f"saved model {directory} was made with another configuration: {lines}")
