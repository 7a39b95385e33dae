"""Datasets in MVTec AD layout, the shared preprocessing, and the embedded offline `textures` set.

Every dataset the suite reads (MVTec AD, BTAD, VisA after its own 1cls split, any user folder)
has the same layout, so one class, `MVTecLayout`, discovers the samples of all of them:

    <root>/<category>/train/<good>/*.png                   nominal training images
    <root>/<category>/test/<good>/*.png                    nominal test images  (label 0)
    <root>/<category>/test/<defect_type>/*.png             anomalous test images (label 1)
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png)

`TexturesDataset` writes such a tree from the photographs scikit-image ships, so the demo
and the tests run with no download.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class DatasetError(ValueError):
    """Bad dataset input; the message names the path/setting and how to fix it."""


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """Shorter side -> `resize` (aspect kept), centre crop `image_size`, normalise: the paper's recipe."""

    resize: int = 256
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Hydra hands over ListConfigs; keep the dataclass hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.interpolation not in _INTERPOLATIONS:
            raise DatasetError(
                f"interpolation={self.interpolation!r} is not supported: use one of {sorted(_INTERPOLATIONS)}"
            )
        if not 0 < self.image_size <= self.resize:
            raise DatasetError(
                f"dataset.image_size={self.image_size} must be between 1 and dataset.resize={self.resize} "
                "(the centre crop is taken from the resized image)"
            )

    def image(self, img: Image.Image) -> torch.Tensor:
        """[3,S,S] float32, normalised; resized as uint8 like the PIL pipeline of the official code."""
        x = F.pil_to_tensor(_to_rgb(img))
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
        x = torch.from_numpy(_nonzero(img)).to(torch.uint8)[None]
        x = F.resize(x, [self.resize], interpolation=InterpolationMode.NEAREST_EXACT)
        return F.center_crop(x, [self.image_size]).float()


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit images are scaled down rather than clipped to white."""
    if img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _nonzero(img: Image.Image) -> np.ndarray:
    """bool [H,W]: True where any colour band is nonzero (works for 0/255, 0/1 and RGB masks)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr != 0
    bands = [i for i, b in enumerate(img.getbands()) if b != "A"]  # an alpha band is no defect
    return np.any(arr[..., bands] != 0, axis=-1)


def read_image(path: Path) -> Image.Image:
    """Fully decoded image, or a DatasetError naming the file (PIL opens lazily)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path}: {err}. Replace or delete the file.") from err


# --------------------------------------------------------------------------- samples


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
            "image": self.preprocessing.image(img),
            "mask": self.preprocessing.mask(mask),
            "has_mask": s.label == 0 or s.mask_path is not None,
            "label": s.label,
            "defect_type": s.defect_type,
            "path": str(s.path),
        }


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


class MVTecLayout:
    """A dataset root in MVTec AD layout: <root>/<category>/{train/<good>, test/<type>, ground_truth/<type>}.

    Nothing is read at construction, so configs instantiate without the data present.
    """

    def __init__(
        self,
        name: str,
        root: str | Path,
        categories: Sequence[str] | None = None,
        good_dirname: str = "good",
        resize: int = 256,
        image_size: int = 224,
        train_limit: int | None = None,
    ):
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root='{self.root}')"

    # -- categories

    def available_categories(self) -> list[str]:
        """The configured categories, or (categories=None) the sub-folders of root with train/<good>."""
        if self.categories is not None:
            return list(self.categories)
        self._check_root()
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
        return Preprocessing(self.resize, self.image_size, tuple(mean), tuple(std), interpolation)

    def train_samples(self, category: str, seed: int = 0) -> list[Sample]:
        """Nominal training images sorted by name; a seeded subset of `train_limit` of them if set."""
        folder = self._category_dir(category) / "train" / self.good_dirname
        paths = _list_images(folder)
        if not paths:
            raise DatasetError(
                f"no training images in {folder}: put the nominal images ({', '.join(IMAGE_EXTENSIONS)}) "
                f"there, or set dataset.good_dirname if the nominal folder has another name"
            )
        if self.train_limit is not None and self.train_limit < len(paths):
            keep = np.random.default_rng(seed).choice(len(paths), self.train_limit, replace=False)
            paths = [paths[i] for i in sorted(keep)]
        return [Sample(p, 0, "good", None) for p in paths]

    def test_samples(self, category: str) -> list[Sample]:
        """Every test/<type> folder: <good_dirname> -> label 0, any other -> that defect type, label 1."""
        cat_dir = self._category_dir(category)
        test_dir = cat_dir / "test"
        types = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
        samples: list[Sample] = []
        for defect_type in types:
            paths = _list_images(test_dir / defect_type)
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

    def train_set(self, category: str, preprocessing: Preprocessing, seed: int = 0) -> AnomalyDataset:
        return AnomalyDataset(self.train_samples(category, seed), preprocessing)

    def test_set(self, category: str, preprocessing: Preprocessing) -> AnomalyDataset:
        return AnomalyDataset(self.test_samples(category), preprocessing)

    # -- helpers

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
        self._check_root()
        path = self.root / category
        if not path.is_dir():
            raise DatasetError(
                f"category folder {path} does not exist: check dataset.root and the category name "
                f"(folders found: {sorted(p.name for p in self.root.iterdir() if p.is_dir())})"
            )
        return path

    def _check_root(self) -> None:
        """Hook run before touching files; TexturesDataset generates its files here."""
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


# --------------------------------------------------------------------------- embedded textures

TEXTURES_VERSION = "textures-generator 1"
TEXTURES_STAMP = ".textures_version"
TEXTURE_SOURCES = {"brick": "brick", "grass": "grass", "gravel": "gravel", "tissue": "immunohistochemistry"}
TEXTURE_DEFECTS = ("scratch", "hole", "color", "foreign")
_SIZE = 256  # generated image side
_CROP_LO, _CROP_HI = 16, 240  # the central 224 x 224 region that the default centre crop keeps
_TINTS = np.array([(220, 40, 40), (40, 190, 60), (50, 80, 230), (235, 205, 30)], dtype=np.float32)


class TexturesDataset(MVTecLayout):
    """The embedded offline dataset: generated deterministically on first use into `root` (MVTec layout)."""

    def __init__(
        self,
        name: str = "textures",
        root: str | Path = "data/textures",
        categories: Sequence[str] | None = None,
        resize: int = 256,
        image_size: int = 224,
        train_limit: int | None = None,
        n_train: int = 40,
        n_test_good: int = 15,
        n_per_defect: int = 6,
    ):
        categories = list(TEXTURE_SOURCES) if categories is None else [str(c) for c in categories]
        unknown = [c for c in categories if c not in TEXTURE_SOURCES]
        if unknown:
            raise DatasetError(f"unknown textures categories {unknown}: choose from {list(TEXTURE_SOURCES)}")
        super().__init__(name, root, categories, "good", resize, image_size, train_limit)
        self.counts = {"n_train": n_train, "n_test_good": n_test_good, "n_per_defect": n_per_defect}
        self._ready = False

    def _check_root(self) -> None:
        if not self._ready:
            ensure_textures(self.root, **self.counts)
            self._ready = True


def ensure_textures(
    root: str | Path, n_train: int = 40, n_test_good: int = 15, n_per_defect: int = 6
) -> Path:
    """Make `root` hold a complete, current copy of the textures set; never delete a folder not ours."""
    root = Path(root).expanduser()
    stamp = f"{TEXTURES_VERSION} n_train={n_train} n_test_good={n_test_good} n_per_defect={n_per_defect}\n"
    if _stamp(root) == stamp and _complete(root):
        return root
    if root.exists() and (not root.is_dir() or (_stamp(root) is None and any(root.iterdir()))):
        raise DatasetError(
            f"{root} exists but has no {TEXTURES_STAMP} file, so it was not generated here and is left "
            "alone: set dataset.root (or TEXTURES_ROOT) to a new folder, or delete this one."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        log.info("generating the embedded textures dataset into %s", root)
        generate_textures(tmp, n_train, n_test_good, n_per_defect)
        (tmp / TEXTURES_STAMP).write_text(stamp)  # last: its presence means the copy is complete
        _move_into_place(tmp, root, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stamp(root: Path) -> str | None:
    path = root / TEXTURES_STAMP
    return path.read_text() if path.is_file() else None


def _complete(root: Path) -> bool:
    return all(
        (root / c / "train" / "good").is_dir() and (root / c / "test").is_dir() for c in TEXTURE_SOURCES
    )


def _move_into_place(tmp: Path, root: Path, stamp: str) -> None:
    """Rename the finished tree onto `root`; an old generated copy is swapped out first, then removed."""
    old = None
    if root.is_dir() and any(root.iterdir()):  # our stamp is there (checked by the caller)
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old)
    elif root.is_dir():
        root.rmdir()
    try:
        os.rename(tmp, root)
    except OSError:
        if _stamp(root) != stamp:  # another process finished first with the same data: keep theirs
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generate_textures(out: Path, n_train: int = 40, n_test_good: int = 15, n_per_defect: int = 6) -> None:
    """Write the MVTec-layout tree into `out`; a fixed seed per category makes the bytes reproducible."""
    photos = _texture_photos()
    for category in TEXTURE_SOURCES:
        rng = np.random.default_rng(zlib.crc32(category.encode()))
        photo = photos[category]
        cat = out / category
        for i in range(n_train):
            _save(cat / "train" / "good" / f"{i:03d}.png", _nominal(photo, rng))
        for i in range(n_test_good):
            _save(cat / "test" / "good" / f"{i:03d}.png", _nominal(photo, rng))
        others = [photos[c] for c in TEXTURE_SOURCES if c != category]
        for kind in TEXTURE_DEFECTS:
            for i in range(n_per_defect):
                foreign = others[rng.integers(len(others))]
                image, mask = _make_defect(kind, _nominal(photo, rng), rng, foreign)
                _save(cat / "test" / kind / f"{i:03d}.png", image)
                _save(cat / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)


def _texture_photos() -> dict[str, np.ndarray]:
    """The scikit-image photographs as uint8 [H,W,3] (they ship with the package: no download)."""
    from skimage import data  # imported here: only the generator needs scikit-image

    photos = {}
    for category, fn in TEXTURE_SOURCES.items():
        arr = getattr(data, fn)()
        photos[category] = np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr[..., :3]
    return photos


def _nominal(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 160-200 px crop, maybe flipped, brightness jittered by 5%, as uint8 256 x 256 x 3."""
    side = int(rng.integers(160, 201))
    y, x = (int(rng.integers(0, n - side + 1)) for n in photo.shape[:2])
    crop = photo[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((_SIZE, _SIZE), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img, np.float32) * rng.uniform(0.95, 1.05), 0, 255).round().astype(np.uint8)


def _make_defect(
    kind: str, base: np.ndarray, rng: np.random.Generator, foreign: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(defect image, bool mask) where the mask is exactly the pixels that differ from `base`."""
    region = _scratch_region(rng) if kind == "scratch" else _blob_region(rng)
    img = base.astype(np.float32)
    if kind == "scratch":  # thin dark or bright line; the other shade where it would not contrast
        under = img[region].mean()
        dark = under > 90 if rng.random() < 0.5 else under > 165
        img[region] = rng.uniform(5, 30) if dark else rng.uniform(225, 250)
    elif kind == "hole":  # dark cavity that keeps a trace of the texture
        img[region] = img[region] * rng.uniform(0.1, 0.2) + 5
    elif kind == "color":  # strong tint
        img[region] = 0.4 * img[region] + 0.6 * _TINTS[rng.integers(len(_TINTS))]
    elif kind == "foreign":  # another category's texture pasted in
        img[region] = _nominal(foreign, rng)[region]
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    out = np.clip(img, 0, 255).round().astype(np.uint8)
    # A pixel the edit left unchanged (e.g. darkening a black pixel) is nudged by one grey level
    # so that the mask stays exactly the changed pixels.
    same = region & np.all(out == base, axis=-1)
    out[same] = np.where(base[same] < 128, base[same] + 1, base[same] - 1)
    return out, region


def _blob_region(rng: np.random.Generator) -> np.ndarray:
    """A wobbly ellipse, 15-50 px across, wholly inside the central 224 crop."""
    radius = rng.uniform(9, 20)
    stretch = rng.uniform(0.75, 1.33)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = 1 + sum(rng.uniform(-0.15, 0.15) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    reach = radius * 1.3 * 1.33 + 4  # the farthest a vertex can be from the centre, plus a margin
    cx, cy = rng.uniform(_CROP_LO + reach, _CROP_HI - reach, size=2)
    xs = cx + radius * wobble * np.cos(theta) * stretch
    ys = cy + radius * wobble * np.sin(theta) / stretch
    return _draw(lambda d: d.polygon(list(zip(xs, ys, strict=True)), fill=255))


def _scratch_region(rng: np.random.Generator) -> np.ndarray:
    """A 3-5 px wide curved line (quadratic Bezier), 35-70 px long, inside the central 224 crop."""
    length = rng.uniform(35, 70)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(_CROP_LO + length / 2 + 8, _CROP_HI - length / 2 - 8, size=2)
    p0, p2 = centre - direction * length / 2, centre + direction * length / 2
    p1 = centre + normal * rng.uniform(-0.35, 0.35) * length
    t = np.linspace(0, 1, 32)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = int(rng.integers(3, 6))
    return _draw(lambda d: d.line([tuple(p) for p in points], fill=255, width=width, joint="curve"))


def _draw(paint) -> np.ndarray:
    canvas = Image.new("L", (_SIZE, _SIZE), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1)  # fast; the set is regenerated, not shipped
