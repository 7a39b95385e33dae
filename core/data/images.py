"""Reading image files: the extensions the suite lists, a decode that names the bad file, and its error type."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """Bad dataset input; the message names the path/setting and how to fix it."""


def read_image(path: Path) -> Image.Image:
    """Fully decoded image, or a DatasetError naming the file (PIL opens lazily)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path}: {err}. Replace or delete the file.") from err
