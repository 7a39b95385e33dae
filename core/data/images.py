"""Reading image files: the extensions the suite lists, a decode that names the bad file, and its error type."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """Bad dataset input; the message names the path/setting and how to fix it."""


def read_image(path: Path) -> Image.Image:
    """Fully decoded image in the file's own mode, or a DatasetError naming the file (PIL opens lazily).
    Pixels are turned into 8-bit RGB by ``core.data.pixels.to_rgb8`` (one rule per pixel type: a float
    TIFF is read as 0..1, a 16-bit PNG by its high byte), so a file and the same pixels passed as an array or
    PIL image give the same crop; masks keep their mode (any nonzero pixel is a defect)."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path}: {err}. Replace or delete the file.") from err
    return img


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
