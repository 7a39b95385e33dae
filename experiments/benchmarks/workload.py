"""The fixed, seeded workload: textures images, loaders, the models and banks the measurements use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.coreset import GreedyCoresetSampler
from core.data import TexturesLayout
from core.features import PatchEmbedder
from core.patchcore import PatchCore
from core.scoring import ScoringHead
from core.search import MemoryBank, SearchOptions
from core.storage import StorageOptions

CATEGORY = "grass"
RATIO = 0.1
# Each aggregation with the distance it is meant with: the official code's embedding and its faiss
# IndexFlatL2 (squared) distances, the suite's earlier embedding and Euclidean distances.
AGGREGATIONS = {"official": "squared", "channel_mean": "euclidean"}
FULL = {"images": 411, "scale_images": (103, 206), "ratio_images": 206, "ratios": (0.01, 0.25),
        "size_images": 103, "sizes": (160, 288), "reference_steps": 200, "radius_images": 40,
        "slow_queries_images": 8, "wrn50_images": 20}
QUICK = {"images": 40, "scale_images": (10, 20), "ratio_images": 20, "ratios": (0.01, 0.25),
         "size_images": 10, "sizes": (160, 288), "reference_steps": 50, "radius_images": 10,
         "slow_queries_images": 2, "wrn50_images": 4}


@dataclass
class Workload:
    """Where the data lives, the plan's sizes and the device every model runs on."""

    root: Path
    plan: dict
    device: torch.device
    skip: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def cache(self, aggregation: str) -> Path:
        """One feature-cache folder per aggregation, so that its first entry is that aggregation's cold fit."""
        return self.root / "cache" / aggregation


def textures(root: Path, images: int, image_size: int = 224, train_limit: int | None = None) -> TexturesLayout:
    dataset = TexturesLayout(root=root / f"textures-{images}", categories=[CATEGORY], n_train=images,
                             resize=round(image_size * 256 / 224), image_size=image_size, train_limit=train_limit)
    dataset.ensure()  # generates the images on first use
    return dataset


def loaders(dataset: TexturesLayout, extractor, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    preprocessing = dataset.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
    train = DataLoader(dataset.train_set(CATEGORY, preprocessing), batch_size=batch_size, num_workers=0)
    test = DataLoader(dataset.test_set(CATEGORY, preprocessing), batch_size=batch_size, num_workers=0)
    return train, test


def preloaded(dataset: TexturesLayout, extractor, split: str = "train") -> torch.Tensor:
    """A split's images preloaded as one tensor (for the backbone-only timings)."""
    preprocessing = dataset.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
    images = (dataset.train_set if split == "train" else dataset.test_set)(CATEGORY, preprocessing)
    return torch.stack([images[i]["image"] for i in range(len(images))])


def new_model(extractor, ratio: float, cache: Path | None, aggregation: str = "official",
              device: torch.device | str = "cpu", **storage) -> PatchCore:
    options = StorageOptions(cache_dir=None if cache is None else str(cache), **storage)
    return PatchCore(extractor, PatchEmbedder(aggregation=aggregation), GreedyCoresetSampler(ratio=ratio, seed=0),
                     search=SearchOptions(), storage=options, scoring=ScoringHead(distance=AGGREGATIONS[aggregation]),
                     device=device, progress=False)


def model_bytes(model: PatchCore) -> int:
    params = sum(p.numel() * p.element_size() for p in model.extractor.parameters())
    return params + model.bank.features.numel() * 4


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def bank_with(features: torch.Tensor, strategy=None) -> MemoryBank:
    """A bank of ``features`` searched by ``strategy`` (None: the one ``choose_strategy`` picks)."""
    return MemoryBank().build(features, strategy)


def model_features(cache: Path) -> torch.Tensor:
    """The first cache entry's features (an .npy file): the cold fit's training features."""
    files = sorted(cache.glob("*.npy"), key=lambda p: p.stat().st_mtime)
    return torch.from_numpy(np.load(files[0])).float()


def test_queries(model: PatchCore, test: DataLoader) -> torch.Tensor:
    """Every test patch's embedding, ``[images * patches, D]`` on the model's device."""
    parts = []
    with torch.no_grad():
        for batch in test:
            features, _ = model.embed(batch["image"])
            parts.append(features.reshape(-1, features.shape[-1]))
    return torch.cat(parts)
