"""The golden-output parity with the official PatchCore code, measured: ``measure(fixtures)``.

The fixtures (``tests/fixtures/official_parity/``, README there) are what the official implementation returned on
fixed inputs. ``tests/test_official_parity.py`` asserts this suite reproduces them; the paper's replication section
measures the same differences again at build time, so the parity it states is the parity of the code that built
it, not a sentence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.features import PatchEmbedder

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official_parity"
EMBEDDING_CASES = ("wrn50_like", "effnet_lite0_like", "resnet18_d256", "vit_like_same_grid")


@dataclass(frozen=True)
class ParityRow:
    """One output compared with the official code's: the largest absolute and relative difference."""

    what: str
    compared: str         # what the official code ran
    max_abs: float
    max_rel: float
    note: str = ""        # why it was not measured


def case_embedding(case: dict, name: str, aggregation: str = "official") -> tuple[torch.Tensor, tuple]:
    """The suite's patch features of one embedding case's two layer maps, and their grid."""
    layers = [torch.from_numpy(case[f"{name}__layer_{layer}"]) for layer in ("a", "b")]
    features, grid = PatchEmbedder(int(case[f"{name}__embed_dim"]), 3, aggregation)(layers)
    return features[0], grid


def preprocess(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """The scoring fixture's images are 256x256, so the official ``Resize(256)`` is a no-op: centre crop 224
    (PIL's offset round((256 - 224) / 2) = 16) and normalise."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = x[:, :, 16:240, 16:240]
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def fit_and_score(extractor, case: dict, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The scoring fixture's setting: every training patch in the bank, k = 1, the official embedding."""
    from core.coreset import AllPatchesSampler
    from core.patchcore import PatchCore
    from core.scoring import ScoringHead

    model = PatchCore(extractor, embedder=PatchEmbedder(1024, 3, "official"), sampler=AllPatchesSampler(),
                      scoring=ScoringHead(num_neighbors=1, distance=distance), progress=False)
    train = preprocess(case["train_images"], extractor.mean, extractor.std)
    model.fit([train[:4], train[4:]])
    return model.score(preprocess(case["test_images"], extractor.mean, extractor.std))


def _differences(ours: torch.Tensor, official: torch.Tensor) -> tuple[float, float]:
    diff = (ours.double() - official.double()).abs()
    return float(diff.max()), float((diff / official.double().abs().clamp_min(1e-12)).max())


def load(path: Path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


@functools.cache  # the same code and fixtures for the whole process: one measurement, however many papers it builds
def measure(fixtures: Path = FIXTURES) -> tuple[ParityRow, ...]:
    """Every golden output against this suite's: the four embedding cases, then the end-to-end image scores and
    anomaly maps with EfficientNet-Lite0's real weights (a row with a note where those weights or the fixtures are
    missing)."""
    rows = []
    if not (fixtures / "embedding_parity.npz").is_file() or not (fixtures / "scoring_parity.npz").is_file():
        return (ParityRow("golden outputs", "-", float("nan"), float("nan"),
                          f"not measured: {fixtures} is not in this tree (a copy without tests/)"),)
    embedding = load(fixtures / "embedding_parity.npz")
    for name in EMBEDDING_CASES:
        ours, _ = case_embedding(embedding, name)
        official = torch.from_numpy(embedding[f"{name}__official_features"])
        a, b = (embedding[f"{name}__layer_{layer}"].shape for layer in ("a", "b"))
        rows.append(ParityRow(f"patch features ({name.replace('_', ' ')})",
                              f"PatchCore._embed on {a[1]}x{a[2]}x{a[3]} and {b[1]}x{b[2]}x{b[3]} maps",
                              *_differences(ours, official)))
    from core.backbones import EfficientNetLite, WeightsNotFoundError

    compared = "EfficientNet-Lite0, 6 training and 3 test images, every patch in the bank, k = 1"
    try:
        extractor = EfficientNetLite(layers=["blocks.4", "blocks.10"], pretrained=True)
    except WeightsNotFoundError as error:
        why = f"not measured: {str(error).splitlines()[0]}"
        return (*rows, *(ParityRow(what, compared, float("nan"), float("nan"), why)
                         for what in ("image scores", "anomaly maps")))
    scoring = load(fixtures / "scoring_parity.npz")
    scores, maps = fit_and_score(extractor, scoring, "squared")
    rows.append(ParityRow("image scores", compared, *_differences(scores, torch.from_numpy(
        scoring["official_image_scores"]))))
    rows.append(ParityRow("anomaly maps (224x224)", compared, *_differences(maps, torch.from_numpy(
        scoring["official_maps"]))))
    return tuple(rows)
