"""What a fine-tuning method implements: an ``Objective`` on the extractor, and the small heads it builds from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.backbones import FeatureExtractor


class Objective(nn.Module):
    """A self-supervised task on the extractor: ``loss(images) -> (loss, stats)``; images are normalised.

    Subclasses add their head modules; everything outside ``self.extractor`` counts as head.
    """

    name = "objective"
    chance_accuracy: float | None = None  # the ``accuracy`` stat of guessing, where it has one (sidecar)

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.register_buffer("mean", torch.tensor(extractor.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(extractor.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def feature_channels(self, size: int = 64) -> list[int]:
        """Channels of each extractor layer (one eval-mode probe forward, running stats untouched)."""
        was_training = self.extractor.training
        self.extractor.eval()
        maps = self.extractor(torch.zeros(1, 3, size, size, device=self.mean.device))
        self.extractor.train(was_training)
        return [m.shape[1] for m in maps]

    def head_parameters(self) -> list[nn.Parameter]:
        return [param for name, param in self.named_parameters() if not name.startswith("extractor.")]

    def reset_head(self) -> None:
        for name, module in self.named_modules():
            if name and not name.startswith("extractor") and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> [0, 1] (what kornia's colour augmentations expect)."""
        return images * self.std + self.mean

    def from_unit(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def pooled(maps: list[torch.Tensor]) -> torch.Tensor:
    """Global average pooling of each map, concatenated: ``[B, sum C_i]``."""
    return torch.cat([F.adaptive_avg_pool2d(m, 1).flatten(1) for m in maps], dim=1)
