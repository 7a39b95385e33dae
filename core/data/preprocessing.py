"""The shared preprocessing: resize the shorter side, centre crop, normalise (the paper's recipe)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from core.data.images import DatasetError
from core.data.pixels import to_rgb8
from core.imagenet import IMAGENET_MEAN, IMAGENET_STD

_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
MASK_RESIZES = ("nearest", "official")


@dataclass(frozen=True)
class Preprocessing:
    """Shorter side -> `resize` (aspect kept), centre crop `image_size`, normalise: the paper's recipe."""

    resize: int = 256
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    # "nearest": any nonzero mask pixel is a defect, resized by nearest-neighbour sampling (keeps every
    # defect pixel); "official": the official code's rule, a bilinear resize of the mask after which only
    # pixels that stay exactly 255 count (the resampled boundary is dropped).
    mask_resize: str = "nearest"

    def __post_init__(self) -> None:
        # Any sequence is accepted; stored as tuples so the dataclass stays hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.interpolation not in _INTERPOLATIONS:
            raise DatasetError(
                f"interpolation={self.interpolation!r} is not supported: use one of {sorted(_INTERPOLATIONS)}"
            )
        if self.mask_resize not in MASK_RESIZES:
            raise DatasetError(f"dataset.mask_resize={self.mask_resize!r} is not supported: use one of {MASK_RESIZES}")
        if not 0 < self.image_size <= self.resize:
            raise DatasetError(
                f"dataset.image_size={self.image_size} must be between 1 and dataset.resize={self.resize} "
                "(the centre crop is taken from the resized image)"
            )

    def image(self, img: Image.Image, what: str = "the image") -> torch.Tensor:
        """[3,S,S] float32, normalised; resized as uint8 like the PIL pipeline of the official code. Pixels
        become 8-bit RGB by ``core.data.pixels.to_rgb8`` (``what`` names the image in its errors)."""
        x = F.pil_to_tensor(to_rgb8(img, what))
        x = F.resize(x, [self.resize], interpolation=_INTERPOLATIONS[self.interpolation], antialias=True)
        x = F.center_crop(x, [self.image_size])
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), list(self.mean), list(self.std))

    def mask(self, img: Image.Image | None) -> torch.Tensor:
        """[1,S,S] float32 in {0,1}: any nonzero pixel is a defect; None (no mask) gives zeros.

        NEAREST_EXACT samples pixel centres like PIL's NEAREST, so the mask stays aligned with the
        bilinear-resized image (torch's legacy "nearest" shifts it by up to half a pixel) and binary.
        """
        if img is None:
            return torch.zeros(1, self.image_size, self.image_size)
        if self.mask_resize == "official":  # PIL's bilinear resize of the 0/255 mask, as the official code does
            binary = Image.fromarray(_nonzero(img).astype(np.uint8) * 255)
            resized = F.center_crop(F.resize(binary, [self.resize], interpolation=InterpolationMode.BILINEAR),
                                    [self.image_size])
            return torch.from_numpy(np.asarray(resized) == 255).float()[None]
        x = torch.from_numpy(_nonzero(img)).to(torch.uint8)[None]
        x = F.resize(x, [self.resize], interpolation=InterpolationMode.NEAREST_EXACT)
        return F.center_crop(x, [self.image_size]).float()


def _nonzero(img: Image.Image) -> np.ndarray:
    """bool [H,W]: True where any colour band is nonzero (works for 0/255, 0/1 and RGB masks)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr != 0
    bands = [i for i, b in enumerate(img.getbands()) if b != "A"]  # an alpha band is no defect
    return np.any(arr[..., bands] != 0, axis=-1)
