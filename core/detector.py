"""What every detector (PatchCore, the autoencoder baseline) promises the harness.

A detector is fitted on a loader of nominal images and predicts image scores and anomaly
maps for a loader of test images; it saves itself to a folder and loads back from one.
The harness (``experiments/``) only talks to this protocol, so a baseline runs through the
same code path, results schema and tables as PatchCore.

Who spends the CPU threads while predictions are collected: ``core/threads.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from core.threads import pipelined


@dataclass
class FitReport:
    """What a fit did: images and patches seen, memory-bank size (None for models without one), and the
    seconds of each stage, named for what they measure (PatchCore: extract, coreset; CAE: train)."""

    n_images: int
    n_patches: int | None
    bank_size: int | None
    timings_s: dict[str, float]


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


@runtime_checkable
class Detector(Protocol):
    """``fit(loader) -> FitReport``, ``predict(loader) -> Predictions``, ``save(folder, ...)``, ``load(folder)``;
    plus the input normalisation its images need (``mean``, ``std``, ``interpolation``) and ``metadata`` from
    a load.

    ``save`` has one signature for every detector, so the harness never asks which kind it holds:
    ``metadata`` (the caller's, stored as given), ``weights`` (True: the folder holds every weight the
    model needs; False: weights that come from elsewhere, e.g. a pretrained backbone, are looked up again
    on load, where the model has such weights), ``threshold`` (the decision thresholds, stored with the model)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def fit(self, loader: Iterable) -> FitReport: ...

    def predict(self, loader: Iterable) -> Predictions: ...

    def save(self, folder: str | Path, *, metadata: dict | None = None, weights: bool = True,
             threshold: dict | None = None) -> Path: ...


def images_of(batch: dict | torch.Tensor) -> torch.Tensor:
    """The image tensor of a loader batch (a dataset dict, or a bare tensor)."""
    return batch["image"] if isinstance(batch, dict) else batch


def _scored_batches(score: Callable, loader: Iterable, workers: int) -> Iterator[tuple[dict | torch.Tensor, tuple]]:
    """``(batch, score(images))`` in loader order. With ``workers > 1``, pieces of the batches are scored at
    once on that many threads, each single-threaded (``core.threads.pipelined``): on a CPU this scales better
    than splitting every operation of one batch across the cores (small convolutions and the search's scans
    do not split well), and the loader reads the next images meanwhile."""
    for batch, parts in pipelined(score, ((batch, images_of(batch)) for batch in loader), workers):
        scores, maps = zip(*parts)
        yield batch, (torch.cat(scores), torch.cat(maps))


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


def load_detector(folder: str | Path, device: str = "cpu", progress: bool = True) -> Detector:
    """The saved model in ``folder``, loaded by the class its ``model.json`` names (``"cae"``: the autoencoder;
    otherwise PatchCore). The name is only read to pick the loader (``core.saved_model.saved_kind``: a
    regular file, no link, size-capped); each loader then checks the whole folder through the same gate
    (manifest, schema, ranges), so a folder cannot skip it by naming another kind."""
    from core.cae import CAE
    from core.patchcore import PatchCore
    from core.saved_model import saved_kind

    loader = CAE if saved_kind(Path(folder)) == "cae" else PatchCore
    return loader.load(folder, device=device, progress=progress)
