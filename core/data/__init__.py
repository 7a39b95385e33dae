"""Datasets: MVTec-layout discovery, the shared preprocessing, the torch dataset and the embedded textures set.

    images.py         reading image files; DatasetError
    pixels.py         one scaling rule per pixel type (uint8, uint16, float) -> 8-bit RGB
    preprocessing.py  Preprocessing: resize, centre crop, normalise
    dataset.py        Sample, AnomalyDataset (files are read only when an item is requested)
    layouts.py        MVTecLayout: the samples of any dataset in MVTec AD layout
    defects.py        synthetic local defects with exact masks, graded by severity (the test set's; never the proxy's)
    textures.py       TexturesLayout and its deterministic generator (no download)
    elpv.py           ElpvLayout: the ELPV solar cells of the elpv-dataset package (real defects, no masks)
"""

from core.data.dataset import AnomalyDataset, Sample
from core.data.elpv import ELPV_CATEGORIES, ELPV_LICENSE, ElpvLayout
from core.data.images import IMAGE_EXTENSIONS, DatasetError, read_image
from core.data.layouts import MVTecLayout, UnreadableFilesError
from core.data.preprocessing import Preprocessing
from core.data.textures import (
    TEXTURE_DEFECTS,
    TEXTURE_SOURCES,
    TEXTURES_STAMP,
    TexturesLayout,
    ensure_textures,
    generate_textures,
)
from core.imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ELPV_CATEGORIES",
    "ELPV_LICENSE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "TEXTURES_STAMP",
    "TEXTURE_DEFECTS",
    "TEXTURE_SOURCES",
    "AnomalyDataset",
    "DatasetError",
    "ElpvLayout",
    "MVTecLayout",
    "Preprocessing",
    "Sample",
    "TexturesLayout",
    "UnreadableFilesError",
    "ensure_textures",
    "generate_textures",
    "read_image",
]
