"""One rule per pixel type for turning any image into the 8-bit RGB the models see, so the same pixels give
the same crop (and the same score) whether they come as a file, a numpy array or a PIL image.

======================================  ==============================================================
pixels                                  read as
======================================  ==============================================================
uint8, PIL L / RGB / RGBA / LA / P / 1  0..255 as they are (PIL's conversion: palette looked up, alpha
                                        dropped without compositing, mode 1 -> 0 / 255)
bool arrays                             False = 0, True = 255
uint16, PIL I;16 / I                    0..65535, reduced to 8 bits by the high byte (``v >> 8``), as
                                        Pillow reads 16-bit RGB(A) PNGs; mode I outside 0..65535 is refused
float arrays, PIL F (float TIFFs)       0..1 (0 black, 1 white: torchvision's ``to_tensor`` convention),
                                        ``round(v * 255)``; NaN, infinite or outside [0, 1] is refused
======================================  ==============================================================

The rule depends on the type only, never on the values (a float image whose maximum is 200 is refused, not
guessed to be 0..255), so an image cannot change meaning because of what it shows.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from core.data.images import DatasetError


class PixelRangeError(DatasetError):
    """An image's pixels have no meaning under the rule of their type (NaN, negative, out of range)."""


def float_to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 (``round(v * 255)``); ``what`` names the image in the error."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        raise PixelRangeError(f"{what} has {int((~finite).sum())} NaN or infinite pixels: float pixels must be "
                              f"finite, in [0, 1]; replace them (e.g. np.nan_to_num) or drop the image")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0.0 or high > 1.0:
        raise PixelRangeError(f"{what} must hold values in [0, 1] (got [{low:.4g}, {high:.4g}]): float pixels are "
                              f"read as 0 = black, 1 = white (torchvision's to_tensor convention); divide by 255 "
                              f"if they are 0-255, or pass uint8 (an 8-bit PNG)")
    return np.round(values * 255.0).astype(np.uint8)


def uint16_to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    """Integer pixels in [0, 65535] -> uint8 by the high byte (how Pillow reads 16-bit RGB PNGs)."""
    values = np.asarray(values)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise PixelRangeError(f"{what} must hold values in [0, 65535] (got [{low}, {high}]): 32-bit integer pixels "
                              f"are read as 16-bit (0 = black, 65535 = white); pass uint8 or uint16 pixels")
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def to_rgb8(image: Image.Image, what: str = "the image") -> Image.Image:
    """``image`` as 8-bit RGB under the rule above; ``PixelRangeError`` naming ``what`` when it has none."""
    if image.mode == "F":
        image = Image.fromarray(float_to_uint8(np.asarray(image), f"{what} (a float image, PIL mode F)"))
    elif image.mode == "I" or image.mode.startswith("I;16"):
        image = Image.fromarray(uint16_to_uint8(np.asarray(image), f"{what} (PIL mode {image.mode})"))
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise PixelRangeError(f"{what}: PIL mode {image.mode} cannot be read as RGB ({error}); convert it to RGB "
                              f"or L first") from None
