"""Synthetic anomalies made from held-out nominal images, with exact masks: the proxy validation set.

CutPaste (Li et al., CVPR 2021) showed that synthetic local defects are a usable validation signal
when no real defect may be looked at. Each held-out nominal image gets one anomaly of every kind in
``SYNTHETIC_KINDS``:

- ``cutpaste``: a box of the image itself, brightness-jittered, pasted elsewhere in it (CutPaste);
- ``cutmix``: a box from another held-out image pasted in (CutMix, Yun et al., ICCV 2019: the
  negatives of extensions/cutmix_contrastive.py);
- ``scratch``, ``hole``, ``color``, ``foreign``: the embedded dataset generator's own defect kinds
  (core/data/defects.py), the foreign texture taken from scikit-image's texture photographs.

Every edit is drawn on a 256 x 256 canvas (the generator's size; its regions stay inside the central
224 x 224 part, so they survive a centre crop of the same proportion) made from the image exactly as
PatchCore sees it (resized and centre-cropped), then brought back to the crop size. The mask is
exactly the pixels that differ from the nominal image: pixels outside it are the nominal image's
own, and a pixel inside that the edit left unchanged is nudged by one grey level (the generator's
rule). Everything is drawn from ``numpy`` generators seeded by ``(seed, image, kind)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.data import Preprocessing, Sample, read_image

# The embedded test set's own defect code, so that the proxy's defects are drawn exactly as its defects are (its
# canvas size and the central region its regions stay inside).
from core.data.defects import CANVAS, CROP_HI, CROP_LO, DEFECT_KINDS, make_defect
from core.data.textures import texture_photos

PASTE_KINDS = ("cutpaste", "cutmix")
SYNTHETIC_KINDS = (*PASTE_KINDS, *DEFECT_KINDS)
_BOX_AREA = (0.01, 0.06)  # pasted box area, as a fraction of the canvas
_BOX_RATIO = (0.3, 3.3)  # its aspect ratio w/h, log-uniform
_DRAWS = 8  # tries at an anomaly whose mask survives the resize to crop size before giving up


@dataclass
class SyntheticSet:
    """Held-out nominal images and their synthetic anomalies, all as uint8 ``[n, S, S, 3]`` crops."""

    nominal: torch.Tensor  # [N, S, S, 3] uint8
    anomalies: torch.Tensor  # [M, S, S, 3] uint8
    masks: torch.Tensor  # [M, S, S] bool
    kinds: list[str]  # per anomaly
    sources: list[int]  # per anomaly: the index of its nominal image

    def normalised(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """uint8 ``[n, S, S, 3]`` -> the float ``[n, 3, S, S]`` a backbone reads (the dataset's normalisation)."""
        x = images.permute(0, 3, 1, 2).float() / 255
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def check_kinds(kinds: Sequence[str]) -> list[str]:
    unknown = [kind for kind in kinds if kind not in SYNTHETIC_KINDS]
    if unknown or not kinds:
        raise ValueError(f"proxy.kinds={list(kinds)}: choose one or more of {list(SYNTHETIC_KINDS)}")
    return list(kinds)


def crop_uint8(sample: Sample, preprocessing: Preprocessing) -> np.ndarray:
    """The image as PatchCore sees it (resized, centre-cropped), before normalisation: uint8 ``[S, S, 3]``."""
    x = preprocessing.image(read_image(sample.path))
    mean, std = torch.tensor(preprocessing.mean).view(3, 1, 1), torch.tensor(preprocessing.std).view(3, 1, 1)
    unit = (x * std + mean).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def make_synthetic(samples: Sequence[Sample], preprocessing: Preprocessing, kinds: Sequence[str] = SYNTHETIC_KINDS,
                   seed: int = 0, category: str | None = None) -> SyntheticSet:
    """One anomaly of every kind for each held-out nominal sample (see the module docstring)."""
    kinds = check_kinds(kinds)
    if not samples:
        raise ValueError("no held-out images to make synthetic anomalies from (raise proxy.holdout)")
    crops = [crop_uint8(sample, preprocessing) for sample in samples]
    canvases = [_to_size(crop, CANVAS) for crop in crops]
    photos = [photo for name, photo in texture_photos().items() if name != category]
    anomalies, masks, kind_of, source_of = [], [], [], []
    for index, crop in enumerate(crops):
        for kind_index, kind in enumerate(kinds):
            rng = np.random.default_rng([seed, index, kind_index])
            for _ in range(_DRAWS):
                drawn = _draw(kind, index, canvases, photos, rng)
                made = _back_to_crop(crop, *drawn)
                if made is not None:
                    anomalies.append(made[0])
                    masks.append(made[1])
                    kind_of.append(kind)
                    source_of.append(index)
                    break
    return SyntheticSet(torch.from_numpy(np.stack(crops)), torch.from_numpy(np.stack(anomalies)),
                        torch.from_numpy(np.stack(masks)), kind_of, source_of)


def _draw(kind: str, index: int, canvases: list[np.ndarray], photos: list[np.ndarray],
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(edited canvas, bool region) on the 256 x 256 canvas of image ``index``."""
    canvas = canvases[index]
    if kind == "cutpaste":
        return paste_box(canvas, canvas, rng, same_image=True)
    if kind == "cutmix":
        others = [i for i in range(len(canvases)) if i != index]
        source = canvases[others[rng.integers(len(others))]] if others else canvas[::-1, ::-1]
        return paste_box(canvas, np.ascontiguousarray(source), rng, same_image=False)
    return make_defect(kind, canvas, rng, photos[rng.integers(len(photos))])


def paste_box(target: np.ndarray, source: np.ndarray, rng: np.random.Generator,
              same_image: bool) -> tuple[np.ndarray, np.ndarray]:
    """A box of ``source`` pasted into ``target``, both inside the canvas's central region; the box of the
    same image is taken at least half a box away along one axis and brightness-jittered (CutPaste)."""
    span = CROP_HI - CROP_LO
    area = rng.uniform(*_BOX_AREA) * CANVAS * CANVAS
    aspect = math.exp(rng.uniform(math.log(_BOX_RATIO[0]), math.log(_BOX_RATIO[1])))
    h = int(min(span // 2, max(2, round(math.sqrt(area / aspect)))))
    w = int(min(span // 2, max(2, round(math.sqrt(area * aspect)))))
    y, x = (int(rng.integers(CROP_LO, CROP_HI - n + 1)) for n in (h, w))
    while True:  # a box at most half the region wide always has a corner far enough away
        sy, sx = (int(rng.integers(CROP_LO, CROP_HI - n + 1)) for n in (h, w))
        if not same_image or abs(sy - y) * 2 >= h or abs(sx - x) * 2 >= w:
            break
    patch = source[sy : sy + h, sx : sx + w].astype(np.float32)
    if same_image:
        patch = patch * rng.uniform(0.8, 1.2)
    out = target.copy()
    out[y : y + h, x : x + w] = np.clip(patch, 0, 255).round().astype(np.uint8)
    region = np.zeros(target.shape[:2], bool)
    region[y : y + h, x : x + w] = True
    return out, region


def _back_to_crop(crop: np.ndarray, edited: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The crop with the edit brought to its size, and the exact mask of changed pixels (None: none survived)."""
    size = crop.shape[0]
    if size != CANVAS:
        region = np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.NEAREST))
        edited = _to_size(edited, size)
    out = crop.copy()
    out[region] = edited[region]
    same = region & np.all(out == crop, axis=-1)
    out[same] = np.where(crop[same] < 128, crop[same] + 1, crop[same] - 1)
    return (out, region) if region.any() else None


def _to_size(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
