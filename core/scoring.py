"""The scoring head of PatchCore (§3.3): nearest-neighbour distances -> patch scores -> image score ->
anomaly map, written once.

``PatchCore.score`` runs it over the memory bank (``core.search.MemoryBank``), the exported graph
(``core.export.graph``) over its chunked dense search: the same torch functions on either, so the
exported model cannot drift from the PyTorch one. The head only needs a ``NeighbourSearch`` from
its caller (search, rows, distances to given rows); the search owns the metric, i.e. for cosine
distances it L2-normalises, once, the bank's rows and every query.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from core.blur import MAX_BLUR_SIGMA, gaussian_blur
from core.records import setting_integer, setting_number

DISTANCES = ("euclidean", "squared", "cosine")
IMAGE_SCORES = ("max", "top_percent")
_KEY = "patchcore.scoring."  # the user-facing config node the messages name


class NeighbourSearch(Protocol):
    """What the head needs of a bank: ``search`` (Euclidean distances between the metric's vectors, i.e.
    unit vectors for cosine, nearest first), the bank ``rows`` at some indices, and the Euclidean
    ``distances`` from queries to given bank rows (Eq. 7)."""

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rows(self, indices: torch.Tensor) -> torch.Tensor: ...

    def distances(self, queries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor: ...


def _integer(key: str, value: object, minimum: int, note: str = "") -> int:
    return setting_integer(f"{_KEY}{key}", value, minimum, note=note)


def _number(key: str, value: object, valid, what: str) -> float:
    return setting_number(f"{_KEY}{key}", value, valid, what)


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{_KEY}{key}={value!r}: choose one of {choices}")
    return value


class ScoringHead:
    """The scoring settings, checked here (the one place), and the scoring computation.

    ``num_neighbors``: k nearest bank patches averaged into a patch score; ``reweight_neighbors``: b of
    the paper's Eq. 7 (None = off); ``distance``: euclidean | squared (the official code's faiss
    IndexFlatL2) | cosine (1 - cos, AnomalyDINO); ``image_score``: max | top_percent (mean of the
    highest ``top_percent`` % of the patch scores); ``blur_sigma``: the anomaly map's Gaussian (0 = none).
    """

    def __init__(self, num_neighbors: int = 1, reweight_neighbors: int | None = None, distance: str = "euclidean",
                 image_score: str = "max", top_percent: float = 1.0, blur_sigma: float = 4.0) -> None:
        self.num_neighbors = _integer("num_neighbors", num_neighbors, 1)
        self.reweight_neighbors = (None if reweight_neighbors is None else
                                   _integer("reweight_neighbors", reweight_neighbors, 1, ", or null for off"))
        self.distance = _choice("distance", distance, DISTANCES)
        self.image_score = _choice("image_score", image_score, IMAGE_SCORES)
        self.top_percent = _number("top_percent", top_percent, lambda v: 0 < v <= 100, "in (0, 100]")
        self.blur_sigma = _number("blur_sigma", blur_sigma, lambda v: 0 <= v <= MAX_BLUR_SIGMA,
                                  f">= 0 (0 = no smoothing) and at most {MAX_BLUR_SIGMA}")
        if self.image_score == "top_percent" and self.reweight_neighbors is not None:
            raise ValueError(f"{_KEY}reweight_neighbors reweights the maximum patch score: it needs "
                             f"{_KEY}image_score=max (or set reweight_neighbors=null)")

    @property
    def metric(self) -> str:
        """The metric the bank searches by: ``cosine`` (unit rows and queries) or ``euclidean``."""
        return "cosine" if self.distance == "cosine" else "euclidean"

    def record(self) -> dict:
        """The settings as the constructor's keywords (a saved model's ``scoring`` node)."""
        return {"num_neighbors": self.num_neighbors, "reweight_neighbors": self.reweight_neighbors,
                "distance": self.distance, "image_score": self.image_score, "top_percent": self.top_percent,
                "blur_sigma": self.blur_sigma}

    def __repr__(self) -> str:
        return f"ScoringHead({', '.join(f'{key}={value!r}' for key, value in self.record().items())})"

    # ------------------------------------------------------------------ the computation
    def score(self, features: torch.Tensor, bank: NeighbourSearch, grid: tuple[int, int],
              size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, h*w, D]`` of test images -> ``(image scores [B], anomaly maps [B, *size])``."""
        batch, patches, dim = features.shape
        distances, nearest = bank.search(features.reshape(-1, dim), self.num_neighbors)
        patch_scores = self.patch_scores(distances).reshape(batch, patches)
        image_scores = self.image_scores(patch_scores, features, nearest.reshape(batch, patches, -1), bank)
        return image_scores, self.anomaly_maps(patch_scores, grid, size)

    def patch_scores(self, distances: torch.Tensor) -> torch.Tensor:
        """``distances [Q, k]`` (Euclidean, of unit vectors for cosine) -> the mean of the k distances in
        the configured form: as they are, squared, or 1 - cos = |a - b|^2 / 2 between unit vectors."""
        if self.distance == "squared":
            distances = distances.square()
        elif self.distance == "cosine":
            distances = distances.square() / 2
        return distances.mean(dim=1)

    def image_scores(self, patch_scores: torch.Tensor, features: torch.Tensor, nearest: torch.Tensor,
                     bank: NeighbourSearch) -> torch.Tensor:
        """The maximum patch score per image, optionally reweighted by Eq. 7; or (``top_percent``) the mean of
        the highest ``top_percent`` % of the patch scores (at least one), AnomalyDINO's image score.
        ``nearest [B, h*w, k]``: each patch's neighbours, found once by ``score``."""
        if self.image_score == "top_percent":
            # floor, as AnomalyDINO's int(N * q): 1% of a 16x16 grid is 2 patches (1e-6: 100/N * N stays N)
            top = max(1, int(patch_scores.shape[1] * self.top_percent / 100 + 1e-6))
            return patch_scores.topk(top, dim=1).values.mean(dim=1)
        scores, best_patch = patch_scores.max(dim=1)
        if self.reweight_neighbors is None:
            return scores
        return self.reweighting(best_patch, features, nearest, bank) * scores

    def reweighting(self, best_patch: torch.Tensor, features: torch.Tensor, nearest: torch.Tensor,
                    bank: NeighbourSearch) -> torch.Tensor:
        """Eq. 7's weight ``1 - softmax`` at m* over N_b(m*): m_test,* is the image's highest-scoring patch,
        m* its nearest bank feature (the first search's), N_b(m*) the b nearest bank features of m* (m*
        itself first), the softmax over the test patch's distances to them."""
        pick = best_patch[:, None, None]
        test_patch = features.gather(1, pick.expand(-1, 1, features.shape[2])).squeeze(1)  # m_test,* [B, D]
        star = nearest[:, :, 0].gather(1, best_patch[:, None]).squeeze(1)  # index of m* [B]
        _, support = bank.search(bank.rows(star), self.reweight_neighbors)  # N_b(m*) [B, b]
        distances = bank.distances(test_patch, support)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    @staticmethod
    def anomalous(values: torch.Tensor, threshold: float) -> torch.Tensor:
        """The decision rule, for image scores and map pixels alike: ``value >= threshold`` is anomalous, and so
        is a value that is not finite (written ``not (finite and value < threshold)``, so a NaN, which compares
        False with everything, is never read as nominal). The exported graph decides by it."""
        return ~(torch.isfinite(values) & (values < threshold))

    def anomaly_maps(self, patch_scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """``patch_scores [B, h*w]`` -> maps ``[B, *size]``: bilinear upsampling, then the Gaussian blur."""
        maps = F.interpolate(patch_scores.reshape(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)
        return gaussian_blur(maps.squeeze(1), self.blur_sigma)
