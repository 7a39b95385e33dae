"""Samples (a file, its label, its mask) and the torch dataset that reads and preprocesses them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.data.images import DatasetError, read_image
from core.data.preprocessing import Preprocessing


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 anomalous
    defect_type: str  # "good" for nominal images
    mask_path: Path | None  # None for good images and for defects without masks


class AnomalyDataset(torch.utils.data.Dataset):
    """Samples -> preprocessed tensors; files are read only when an item is requested."""

    def __init__(self, samples: list[Sample], preprocessing: Preprocessing):
        self.samples = samples
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        img = read_image(s.path)
        mask = read_image(s.mask_path) if s.mask_path is not None else None
        if mask is not None and mask.size != img.size:
            raise DatasetError(
                f"mask {s.mask_path} is {mask.size[0]}x{mask.size[1]} but image {s.path} is "
                f"{img.size[0]}x{img.size[1]}: masks must have the size of their image."
            )
        return {
            "image": self.preprocessing.image(img, f"image {s.path}"),
            "mask": self.preprocessing.mask(mask),
            "has_mask": s.label == 0 or s.mask_path is not None,
            "label": s.label,
            "defect_type": s.defect_type,
            "path": str(s.path),
        }
