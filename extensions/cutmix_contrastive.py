"""Contrastive learning with CutMix-made anomalies, on nominal images only.

SimCLR's NT-Xent (Chen et al., ICML 2020): two augmented views of a nominal image are a positive
pair; every other image of the batch is a negative. On top of that, each image gets a CutMix copy
(Yun et al., ICCV 2019) of a third view: a box cut from another nominal image, or from elsewhere
in the same image, pasted in. It is a synthetic local anomaly, and an extra negative: the
embedding must tell an image from the same image with a foreign patch, which is the distinction
PatchCore relies on. (It is a negative for every anchor, and the hardest one for its own source.)

The projection head sits on the globally pooled features of all PatchCore layers (mid-level),
so it is those layers that learn. Augmentations are mild on colour on purpose: colour is often
what a defect is, so the features must not become colour-invariant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
import torch.nn.functional as F

from core.backbones import FeatureExtractor
from extensions.objective import Objective, mlp, pooled


@dataclass
class CutMixPlan:
    """For each target image i: paste ``source[i]``'s box of ``size[i] = (h, w)`` from ``src[i] = (y, x)``
    (top-left corner) onto ``dst[i]`` in image i."""

    source: torch.Tensor  # [N] long
    size: torch.Tensor  # [N, 2] long
    src: torch.Tensor  # [N, 2] long
    dst: torch.Tensor  # [N, 2] long


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(high: int) -> int:
    """Uniform in [0, high]."""
    return int(torch.randint(high + 1, ()).item())


def check_box_ranges(scale: Sequence[float], ratio: Sequence[float]) -> None:
    """The box area fractions and aspect ratios must be ordered, positive ranges."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"method.objective.box_scale={list(scale)}: need 0 < low <= high <= 1 "
                         "(fractions of the image area)")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"method.objective.box_ratio={list(ratio)}: need 0 < low <= high")


def plan_cutmix(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.02, 0.25),
    ratio: Sequence[float] = (0.3, 3.3),
    same_image_prob: float = 0.5,
) -> CutMixPlan:
    """Random boxes: area a fraction U(scale) of the image, aspect ratio w/h log-uniform in ``ratio``.

    With probability ``same_image_prob`` the box comes from elsewhere in the same image (displaced by
    at least half its size along one axis, so it is never pasted onto itself), otherwise from another
    image of the batch. Drawn from torch's global RNG, which ``method.train.seed`` seeds.
    """
    check_box_ranges(scale, ratio)
    source, size, src, dst = [], [], [], []
    for i in range(n):
        area = _uniform(scale[0], scale[1]) * height * width
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
        h = min(height, max(1, round(math.sqrt(area / aspect))))
        w = min(width, max(1, round(math.sqrt(area * aspect))))
        same = n == 1 or torch.rand(()).item() < same_image_prob
        y, x = _randint(height - h), _randint(width - w)
        if same:
            moved, (sy, sx) = _corner_elsewhere(y, x, h, w, height, width)
            same = moved or n == 1  # a box too large to move within the image comes from another image
        if not same:
            sy, sx = _randint(height - h), _randint(width - w)
        j = i if same else (i + 1 + _randint(n - 2)) % n
        source.append(j)
        size.append((h, w))
        src.append((sy, sx))
        dst.append((y, x))
    long = dict(dtype=torch.long)
    return CutMixPlan(torch.tensor(source, **long), torch.tensor(size, **long).view(-1, 2),
                      torch.tensor(src, **long).view(-1, 2), torch.tensor(dst, **long).view(-1, 2))


def _corner_elsewhere(y: int, x: int, h: int, w: int, height: int, width: int) -> tuple[bool, tuple[int, int]]:
    """(found, corner): a corner at least half a box away from (y, x) along one axis, in up to 32 draws
    (``found`` False when none was: the corner is then the last one drawn)."""
    for _ in range(32):
        sy, sx = _randint(height - h), _randint(width - w)
        if abs(sy - y) * 2 >= h or abs(sx - x) * 2 >= w:
            return True, (sy, sx)
    return False, (sy, sx)


def cutmix(images: torch.Tensor, plan: CutMixPlan) -> torch.Tensor:
    """Apply ``plan`` to a batch; boxes are read from the original images, not from already-mixed ones."""
    mixed = images.clone()
    for i, (j, (h, w), (sy, sx), (y, x)) in enumerate(
        zip(plan.source.tolist(), plan.size.tolist(), plan.src.tolist(), plan.dst.tolist(), strict=True)
    ):
        mixed[i, :, y : y + h, x : x + w] = images[j, :, sy : sy + h, sx : sx + w]
    return mixed


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, negatives: torch.Tensor | None = None,
            temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent with extra negatives.

    The 2N anchors are the rows of ``z1`` and ``z2``; anchor ``z1[i]``'s positive is ``z2[i]`` and
    vice versa. Candidates are all 2N views (except the anchor itself) plus every row of
    ``negatives``; similarity is cosine / ``temperature``; the loss is the mean over anchors of
    ``-log(exp(s_pos) / sum_candidates exp(s))``.
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = z if negatives is None else torch.cat([z, F.normalize(negatives, dim=1)])
    logits = z @ candidates.T / temperature
    anchors = torch.arange(2 * n, device=z.device)
    logits[anchors, anchors] = float("-inf")  # an anchor is not its own candidate
    return F.cross_entropy(logits, (anchors + n) % (2 * n))


class CutMixContrastive(Objective):
    name = "cutmix_contrastive"

    def __init__(
        self,
        extractor: FeatureExtractor,
        temperature: float = 0.2,
        box_scale: Sequence[float] = (0.02, 0.25),
        box_ratio: Sequence[float] = (0.3, 3.3),
        same_image_prob: float = 0.5,
        crop_scale: Sequence[float] = (0.6, 1.0),
        jitter: float = 0.1,
        hidden_dim: int = 512,
        projection_dim: int = 128,
    ) -> None:
        super().__init__(extractor)
        if temperature <= 0:
            raise ValueError(f"method.objective.temperature={temperature} must be > 0")
        self.temperature = float(temperature)
        self.box_scale, self.box_ratio = tuple(box_scale), tuple(box_ratio)
        check_box_ranges(self.box_scale, self.box_ratio)  # now, not at step 1
        self.same_image_prob = float(same_image_prob)
        self.crop_scale, self.jitter = tuple(crop_scale), float(jitter)
        self.head = mlp(sum(self.feature_channels()), hidden_dim, projection_dim)
        self._augmenters: dict[tuple[int, int], K.AugmentationSequential] = {}

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """One random view per image: resized crop, horizontal flip, mild brightness/contrast/saturation jitter."""
        size = tuple(images.shape[-2:])
        if size not in self._augmenters:
            self._augmenters[size] = K.AugmentationSequential(
                K.RandomResizedCrop(size, scale=self.crop_scale),
                K.RandomHorizontalFlip(),
                K.ColorJitter(self.jitter, self.jitter, self.jitter, 0.0, p=0.8),
            )
        return self.from_unit(self._augmenters[size](self.to_unit(images).clamp(0, 1)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(pooled(self.extractor(images)))

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        n, _, height, width = images.shape
        view1, view2, view3 = self.augment(images), self.augment(images), self.augment(images)
        mixed = cutmix(view3, plan_cutmix(n, height, width, self.box_scale, self.box_ratio, self.same_image_prob))
        z1, z2, negatives = self.embed(torch.cat([view1, view2, mixed])).split(n)
        loss = nt_xent(z1, z2, negatives, self.temperature)
        with torch.no_grad():  # share of anchors whose nearest candidate is their positive
            z = F.normalize(torch.cat([z1, z2]), dim=1)
            sims = z @ F.normalize(torch.cat([z1, z2, negatives]), dim=1).T
            sims.fill_diagonal_(float("-inf"))
            hits = sims.argmax(dim=1) == (torch.arange(2 * n, device=z.device) + n) % (2 * n)
        return loss, {"accuracy": hits.float().mean().item()}
