"""Reading image files: the extensions the suite lists, a decode that names the bad file, and its error type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """Bad dataset input; the message names the path/setting and how to fix it."""


def read_image(path: Path) -> Image.Image:
    """Fully decoded image, or a DatasetError naming the file (PIL opens lazily). Float images (PIL mode
    ``F``, e.g. 32-bit TIFFs) come back as 8-bit greyscale: PIL's own conversion clips them, so a [0, 1]
    image would turn black."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path}: {err}. Replace or delete the file.") from err
    return _float_to_8bit(img, path) if img.mode == "F" else img


def _float_to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """[0, 1] floats scale by 255, [0, 255] floats are kept; any other range has no agreed meaning."""
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DatasetError(f"image {path} is a float image with NaN or infinite pixels. Replace or delete the file.")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low < 0.0 or high > 255.0:
        raise DatasetError(f"image {path} is a float image with pixel values in [{low:.4g}, {high:.4g}]: only [0, 1] "
                           "and [0, 255] have a meaning here. Convert it to an 8-bit PNG (or scale it to [0, 1]).")
    return Image.fromarray(np.round(values).astype(np.uint8))  # mode L


def header_problem(path: Path, mask_path: Path | None = None) -> str | None:
    """Why ``path`` (and its mask) cannot be used, from the headers alone (fast: no pixel decoding), or None.

    ``verify`` checks the file's structure (PNG chunk checksums, truncation of most formats) without
    decoding it; a file that passes may still fail to decode, which ``read_image`` then reports."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"cannot read image {path}: {err}"
    if mask_path is None:
        return None
    try:
        with Image.open(mask_path) as mask:
            mask_size = mask.size
            mask.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"cannot read mask {mask_path}: {err}"
    if mask_size != size:
        return (f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but image {path} is {size[0]}x{size[1]}: "
                "masks must have the size of their image")
    return None
