"""Datasets in MVTec AD layout: one class, ``MVTecLayout``, discovers the samples of all of them.

Every dataset the suite reads (MVTec AD, BTAD, VisA after its own 1cls split, any user folder)
has the same layout:

    <root>/<category>/train/<good>/*.png                   nominal training images
    <root>/<category>/test/<good>/*.png                    nominal test images  (label 0)
    <root>/<category>/test/<defect_type>/*.png             anomalous test images (label 1)
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.data.dataset import AnomalyDataset, Sample
from core.data.images import IMAGE_EXTENSIONS, DatasetError, header_problem
from core.data.preprocessing import MASK_RESIZES, Preprocessing


def _list_images(folder: Path) -> list[Path]:
    """Image files in `folder`, sorted by name; hidden files (macOS `._x.png`) are skipped."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _mask_index(folder: Path) -> dict[str, Path]:
    """stem -> mask file in a ground-truth folder (first by name when extensions collide)."""
    index: dict[str, Path] = {}
    for p in _list_images(folder):
        index.setdefault(p.stem, p)
    return index


# --------------------------------------------------------------------------- MVTec layout


class UnreadableFilesError(DatasetError):
    """The start-up scan found unreadable images or masks of a size other than their image's."""


class MVTecLayout:
    """A dataset root in MVTec AD layout: <root>/<category>/{train/<good>, test/<type>, ground_truth/<type>}.

    Nothing is read at construction, so configs instantiate without the data present.
    """

    # Defect types scored and recorded but kept out of the main metrics (image AUROC, F1-max, thresholds):
    # each gets its own AUROC against the nominal test images instead (core/data/elpv.py: the cells whose
    # graders disagreed). Empty for datasets whose every defect type is a defect.
    excluded_from_main_metrics: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        root: str | Path,
        categories: Sequence[str] | None = None,
        good_dirname: str = "good",
        resize: int = 256,
        image_size: int = 224,
        train_limit: int | None = None,
        skip_unreadable: bool = False,
        mask_resize: str = "nearest",
    ):
        for key, pixels in (("resize", resize), ("image_size", image_size)):
            if pixels < 1:
                raise DatasetError(f"dataset.{key}={pixels} must be a positive number of pixels")
        if image_size > resize:
            raise DatasetError(f"dataset.image_size={image_size} must be <= dataset.resize={resize} (the crop is "
                               "taken from the resized image)")
        if train_limit is not None and train_limit < 1:
            raise DatasetError(
                f"dataset.train_limit={train_limit} must be a positive number of training images, "
                "or null to use them all"
            )
        self.name = name
        self.root = Path(root).expanduser()
        self.categories = None if categories is None else [str(c) for c in categories]
        self.good_dirname = good_dirname
        self.resize = resize
        self.image_size = image_size
        self.train_limit = train_limit
        self.skip_unreadable = skip_unreadable
        self.mask_resize = mask_resize
        if mask_resize not in MASK_RESIZES:  # found at start-up, by name
            raise DatasetError(f"dataset.mask_resize={mask_resize!r} is not supported: use one of {MASK_RESIZES}")
        self.unreadable: dict[str, list[str]] = {}  # category -> what scan() found and skipped
        self._skipped: set[Path] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root='{self.root}')"

    # -- categories

    def available_categories(self) -> list[str]:
        """The configured categories, or (categories=None) the sub-folders of root with train/<good>."""
        if self.categories is not None:
            return list(self.categories)
        self._require_root()
        found = sorted(p.name for p in self.root.iterdir() if (p / "train" / self.good_dirname).is_dir())
        if not found:
            raise DatasetError(
                f"no category folders found under {self.root}: a category is a sub-folder with "
                f"train/{self.good_dirname}/ inside.\n{self._layout_hint()}"
            )
        return found

    def resolve_categories(self, spec: str | Sequence[str]) -> list[str]:
        """'all' -> every category; one name; or a list of names (any non-str Sequence)."""
        valid = self.available_categories()
        if isinstance(spec, str):
            wanted = valid if spec == "all" else [spec]
        elif isinstance(spec, Sequence):
            wanted = [str(c) for c in spec]
        else:
            wanted = [str(spec)]
        unknown = [c for c in wanted if c not in valid]
        if unknown or not wanted:
            raise DatasetError(
                f"unknown {self.name} categories {unknown} in category={spec!r}: choose 'all' or from {valid}"
                f" (categories of another dataset need dataset=mvtec|btad|visa|folder and dataset.root=...)"
            )
        return wanted

    # -- samples

    def preprocessing(self, mean, std, interpolation: str = "bilinear") -> Preprocessing:
        """The dataset's resize/crop with the backbone's normalisation and interpolation."""
        return Preprocessing(self.resize, self.image_size, tuple(mean), tuple(std), interpolation, self.mask_resize)

    def train_samples(self, category: str, seed: int = 0) -> list[Sample]:
        """Nominal training images sorted by name; a seeded subset of `train_limit` of them if set."""
        folder = self._category_dir(category) / "train" / self.good_dirname
        paths = [p for p in _list_images(folder) if p not in self._skipped]
        if not paths:
            raise DatasetError(
                f"no training images in {folder}: put the nominal images ({', '.join(IMAGE_EXTENSIONS)}) "
                f"there, or set dataset.good_dirname if the nominal folder has another name"
            )
        return [Sample(p, 0, "good", None) for p in self.limited(paths, seed)]

    def test_samples(self, category: str) -> list[Sample]:
        """Every test/<type> folder: <good_dirname> -> label 0, any other -> that defect type, label 1."""
        cat_dir = self._category_dir(category)
        test_dir = cat_dir / "test"
        types = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
        samples: list[Sample] = []
        for defect_type in types:
            paths = [p for p in _list_images(test_dir / defect_type) if p not in self._skipped]
            if defect_type == self.good_dirname:
                samples += [Sample(p, 0, "good", None) for p in paths]
            elif paths:
                samples += self._defect_samples(paths, defect_type, cat_dir / "ground_truth" / defect_type)
        if not samples:
            raise DatasetError(
                f"no test images in {test_dir}: expected test/{self.good_dirname}/ and "
                "test/<defect_type>/ sub-folders holding images"
            )
        return samples

    def scan(self, category: str, seed: int = 0) -> list[str]:
        """Check every training and test image (and mask) of ``category`` from its header, before any work.

        Unreadable files raise one ``DatasetError`` listing all of them; with ``skip_unreadable`` they are
        left out of the samples instead, and returned (also kept in ``unreadable[category]``)."""
        samples = [*self.train_samples(category, seed), *self.test_samples(category)]
        found = [(s.path, problem) for s in samples if (problem := header_problem(s.path, s.mask_path))]
        if found and not self.skip_unreadable:
            listed = "\n  ".join(problem for _, problem in found[:20])
            more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
            raise UnreadableFilesError(f"{len(found)} unreadable files in category {category!r}:\n  {listed}{more}\n"
                               "Replace or delete them, or set dataset.skip_unreadable=true to skip and list them.")
        self._skipped |= {path for path, _ in found}
        self.unreadable[category] = [problem for _, problem in found]
        return self.unreadable[category]

    def train_set(self, category: str, preprocessing: Preprocessing, seed: int = 0) -> AnomalyDataset:
        return AnomalyDataset(self.train_samples(category, seed), preprocessing)

    def test_set(self, category: str, preprocessing: Preprocessing) -> AnomalyDataset:
        return AnomalyDataset(self.test_samples(category), preprocessing)

    # -- helpers

    def limited(self, paths: list[Path], seed: int) -> list[Path]:
        """A seeded subset of ``train_limit`` of ``paths`` (in their order), or all of them."""
        if self.train_limit is None or self.train_limit >= len(paths):
            return paths
        keep = np.random.default_rng(seed).choice(len(paths), self.train_limit, replace=False)
        return [paths[i] for i in sorted(keep)]

    def _defect_samples(self, paths: list[Path], defect_type: str, gt_dir: Path) -> list[Sample]:
        """Pair each defect image with `<stem>_mask.*` (MVTec) or `<stem>.*` (BTAD, VisA)."""
        index = _mask_index(gt_dir)
        masks = [index.get(f"{p.stem}_mask") or index.get(p.stem) for p in paths]
        missing = sum(m is None for m in masks)
        if missing:
            warnings.warn(
                f"{missing} of {len(paths)} images in {paths[0].parent} have no mask in {gt_dir}: "
                f"pixel metrics will be skipped for them (defect type {defect_type!r}). "
                "Masks are looked up as <stem>_mask.<ext> or <stem>.<ext>.",
                stacklevel=3,
            )
        return [Sample(p, 1, defect_type, m) for p, m in zip(paths, masks, strict=True)]

    def _category_dir(self, category: str) -> Path:
        self._require_root()
        path = self.root / category
        if not path.is_dir():
            raise DatasetError(
                f"category folder {path} does not exist: check dataset.root and the category name "
                f"(folders found: {sorted(p.name for p in self.root.iterdir() if p.is_dir())})"
            )
        return path

    def _require_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"{self.name} dataset root {self.root} is a file, not a folder: set dataset.root to "
                               f"the folder that holds the categories.\n{self._layout_hint()}")
        if not self.root.is_dir():
            raise DatasetError(f"{self.name} dataset root {self.root} does not exist.\n{self._layout_hint()}")

    def _layout_hint(self) -> str:
        r, g = self.root, self.good_dirname
        return (
            f"Expected layout:\n  {r}/<category>/train/{g}/<image>.png\n"
            f"  {r}/<category>/test/{g}/<image>.png\n"
            f"  {r}/<category>/test/<defect_type>/<image>.png\n"
            f"  {r}/<category>/ground_truth/<defect_type>/<image>_mask.png\n"
            f"Set dataset.root=/path/to/{self.name} or the environment variable {self.name.upper()}_ROOT."
        )
