"""Rotation prediction (Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by
Predicting Image Rotations", ICLR 2018), on nominal images only.

Every image of the batch is shown at 0, 90, 180 and 270 degrees (all four, as in the paper), and
a small MLP on the globally pooled features of the deepest PatchCore layer predicts which. To
solve it the backbone has to encode the canonical orientation of the object's parts: product-
specific structure that ImageNet features only partly capture. (On rotation-invariant textures
the task is ill-posed; the loss then stays near log 4 and L2-SP keeps the weights close to w0.)
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F

from core.backbones import FeatureExtractor
from extensions.objective import Objective, mlp

ROTATIONS = 4


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B,3,H,W] -> ([4B,3,H,W], labels [4B])``: block k holds every image turned k*90 degrees counter-clockwise."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation prediction needs square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return rotated, labels


class RotationPrediction(Objective):
    name = "rotation"
    chance_accuracy = 1 / ROTATIONS  # on direction-free textures the accuracy staying near this is a finding

    def __init__(self, extractor: FeatureExtractor, hidden_dim: int = 256, flip: bool = True) -> None:
        super().__init__(extractor)
        self.head = mlp(self.feature_channels()[-1], hidden_dim, ROTATIONS)
        # A horizontal flip is no rotation, so it adds variety without making the labels ambiguous.
        self.augment = K.RandomHorizontalFlip(p=0.5) if flip else None

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self.augment is not None:
            images = self.augment(images)
        rotated, labels = rotate_batch(images)
        logits = self.head(self.extractor(rotated)[-1].mean(dim=(2, 3)))
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(dim=1) == labels).float().mean().item()}
