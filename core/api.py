"""Images as a user has them (files, numpy arrays, PIL images; any size) -> the model's input batch, and the
model's crop-sized outputs -> maps, masks and decisions at each input's own resolution.

Shared by ``PatchCore.predict_images`` and the exported-model wrapper (``core.export``), so both see the
same preprocessing: the ``core.data.Preprocessing`` the model was fitted with (shorter side resized to
``resize``, centre crop ``image_size``, normalised with the extractor's mean/std), recorded in ``model.json``.

Going back to the input's resolution (``ImagePredictions.from_crops``): the crop's map is pasted onto the
resized image's canvas at the crop's position, the border the crop cut off gets 0 (it was not scored),
and the canvas is resized bilinearly to the original height x width. A mask is the pixel threshold applied
to that canvas (small regions dropped as at evaluation, ``min_defect_area``), resized by nearest neighbour.
Set ``dataset.resize`` equal to ``dataset.image_size`` when fitting to score the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from core.data import Preprocessing, read_image
from core.data.pixels import PixelRangeError, float_to_uint8, to_rgb8, uint16_to_uint8
from core.thresholds import segment

ImageInput = str | Path | np.ndarray | Image.Image
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class ImageInputError(ValueError):
    """An input image cannot be turned into an RGB image; the message names the input and the fix."""


def model_preprocessing(model) -> Preprocessing:
    """The ``Preprocessing`` a model (anything with a ``preprocessing`` attribute) was fitted with."""
    preprocessing = getattr(model, "preprocessing", None)
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing(**preprocessing)
    if not isinstance(preprocessing, Preprocessing):
        raise ValueError("the model has no preprocessing record (resize, crop, mean, std): it was fitted without "
                         "a dataset that records one, or saved by an older version; refit it with "
                         "`python experiments/main.py ... save_model=true`")
    return preprocessing


def to_pil(image: ImageInput, index: int = 0) -> Image.Image:
    """One input as an 8-bit RGB PIL image: a path (read and checked by ``core.data.read_image``), a PIL image
    of any mode, or a numpy array HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA, alpha dropped). Pixels are scaled by
    their type alone (``core.data.pixels``: uint8 0..255, uint16 / I;16 / I 0..65535, float / mode F 0..1),
    so a file, an array and a PIL image holding the same pixels give the same crop; pixels outside their
    type's range (or NaN) are an ``ImageInputError`` naming the input's position."""
    if isinstance(image, (str, Path)):
        return to_rgb8(read_image(Path(image)), f"input {index} ({image})")
    try:
        if isinstance(image, Image.Image):
            return to_rgb8(image, f"input {index}")
        if isinstance(image, np.ndarray):
            return to_rgb8(_array_to_pil(image, index), f"input {index}")
    except PixelRangeError as error:
        raise ImageInputError(str(error)) from None
    raise ImageInputError(f"input {index} is a {type(image).__name__}: pass a file path, a numpy array "
                          f"(HxW, HxWx3 or HxWx4) or a PIL image")


def _array_to_pil(array: np.ndarray, index: int) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ImageInputError(f"input {index}: an array of shape {array.shape} is not an image: pass HxW (grey), "
                              f"HxWx3 (RGB) or HxWx4 (RGBA), channels last")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == bool:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        pixels = uint16_to_uint8(array, f"input {index}")
    elif np.issubdtype(array.dtype, np.floating):
        pixels = float_to_uint8(array, f"input {index}: a float array")
    else:
        raise ImageInputError(f"input {index}: arrays of dtype {array.dtype} are not images: pass uint8 (0-255), "
                              f"uint16 (0-65535) or float (0-1)")
    return Image.fromarray(np.ascontiguousarray(pixels))


def crop_uint8(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """[3, S, S] uint8: resized and centre-cropped, not normalised (the first half of ``Preprocessing.image``;
    tests/test_predict_images.py checks that normalising it gives ``Preprocessing.image`` exactly)."""
    x = TF.pil_to_tensor(to_rgb8(image))
    x = TF.resize(x, [preprocessing.resize], interpolation=_INTERPOLATIONS[preprocessing.interpolation],
                  antialias=True)
    return TF.center_crop(x, [preprocessing.image_size])


def normalize(batch: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> the model's float input (scaled to [0, 1], then mean/std)."""
    return TF.normalize(TF.to_dtype(batch, torch.float32, scale=True), list(preprocessing.mean),
                        list(preprocessing.std))


def prepare_images_uint8(inputs: Sequence[ImageInput], model) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``(uint8 batch [N, 3, S, S], original (height, width) of each input)``: resized and cropped as the
    model was fitted, NOT normalised. For graphs that normalise inside (the exported models of
    ``core.export``): ``normalize(batch, preprocessing)`` gives exactly ``prepare_images``' batch."""
    if isinstance(inputs, (str, Path, np.ndarray, Image.Image)):
        inputs = [inputs]
    if len(inputs) == 0:
        raise ImageInputError("no images given: pass a list of paths, numpy arrays or PIL images")
    preprocessing = model_preprocessing(model)
    crops, sizes = [], []
    for index, item in enumerate(inputs):
        image = to_pil(item, index)
        sizes.append((image.height, image.width))
        crops.append(crop_uint8(image, preprocessing))
    return torch.stack(crops), sizes


def prepare_images(inputs: Sequence[ImageInput], model) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``(float batch [N, 3, S, S], original (height, width) of each input)``: each input preprocessed exactly
    as the model's own test images were (``model.preprocessing``). Inputs: paths, numpy arrays, PIL images,
    any size and mix (see ``to_pil``). The stable interface of this module (``core.export`` uses it)."""
    batch, sizes = prepare_images_uint8(inputs, model)
    return normalize(batch, model_preprocessing(model)), sizes


# --------------------------------------------------------------------------- back to the input's resolution


@dataclass(frozen=True)
class CropGeometry:
    """Where the centre crop of the resized image lies, to paste maps back at the original size."""

    resized: tuple[int, int]
    top: int
    left: int

    @classmethod
    def of(cls, height: int, width: int, preprocessing: Preprocessing) -> CropGeometry:
        # torchvision's Resize(int): the shorter side becomes `resize`, the longer one is floored.
        short, long = sorted((height, width))
        new_short, new_long = preprocessing.resize, int(preprocessing.resize * long / short)
        resized = (new_short, new_long) if height <= width else (new_long, new_short)
        size = preprocessing.image_size
        return cls(resized, int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0)))

    def uncrop(self, crop_map: np.ndarray) -> np.ndarray:
        """The crop's map on the resized canvas; the unscored border is 0."""
        canvas = np.zeros(self.resized, dtype=np.float32)
        size = crop_map.shape[0]
        canvas[self.top : self.top + size, self.left : self.left + size] = crop_map
        return canvas


def resize_map(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """A 2-D map resized to ``size`` (height, width): ``bilinear`` for scores, ``nearest`` for masks."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=size, mode=mode, **kwargs)[0, 0].numpy()


@dataclass
class ImagePredictions:
    """What ``predict_images`` returns, one entry per input, in input order.

    ``scores``: float [N] image scores. ``maps``: per input a float32 [h, w] anomaly map at that input's
    resolution (0 where the crop cut the image off). ``masks``: per input a bool [h, w] defect mask
    (map >= the pixel threshold), or None when the model was saved without a pixel threshold.
    ``decisions``: bool [N], True = anomalous (score >= the image threshold), or None without one.
    ``crop_maps``: float32 [N, S, S], the maps at the model's crop resolution.
    """

    scores: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray] | None
    decisions: np.ndarray | None
    crop_maps: np.ndarray
    image_threshold: float | None = None
    pixel_threshold: float | None = None

    @classmethod
    def from_crops(cls, scores, crop_maps, original_sizes: Sequence[tuple[int, int]], preprocessing: Preprocessing,
                   threshold: dict | None = None) -> ImagePredictions:
        """Build the result from the model's crop-sized outputs (``scores [N]``, ``crop_maps [N, S, S]``) and the
        ``threshold`` record saved with the model (``image_threshold``, ``pixel_threshold``, ``min_defect_area``)."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        crop_maps = np.asarray(crop_maps, dtype=np.float32)
        threshold = threshold or {}
        image_threshold, pixel_threshold = threshold.get("image_threshold"), threshold.get("pixel_threshold")
        min_area = int(threshold.get("min_defect_area") or 0)
        maps, masks = [], [] if pixel_threshold is not None else None
        for crop_map, (height, width) in zip(crop_maps, original_sizes):
            geometry = CropGeometry.of(height, width, preprocessing)
            canvas = geometry.uncrop(crop_map)
            maps.append(resize_map(canvas, (height, width), "bilinear"))
            if masks is not None:
                defect = segment(canvas, pixel_threshold, min_area).astype(np.float32)
                masks.append(resize_map(defect, (height, width), "nearest") > 0.5)
        decisions = None if image_threshold is None else scores >= image_threshold
        return cls(scores, maps, masks, decisions, crop_maps,
                   None if image_threshold is None else float(image_threshold),
                   None if pixel_threshold is None else float(pixel_threshold))
