"""Synthetic anomalies made from held-out nominal images, with exact masks: the proxy validation set.

CutPaste (Li et al., CVPR 2021) and DRAEM (Zavrtanik et al., ICCV 2021) showed that synthetic local
anomalies are a usable validation signal when no real defect may be looked at. The families here are
disjoint from the generator of the embedded test set (core/data/defects.py: scratch, hole, colour
tint, a foreign scikit-image photograph): this module never imports it, nor any scikit-image image
(tests/test_proxy_leakage.py walks the import graph), so a checkpoint chosen by the proxy is not tuned
to the test's defects. Each held-out nominal image gets one anomaly of every family in ``kinds``:

- ``cutpaste``: a box of the image itself, brightness-jittered, blended in elsewhere (CutPaste);
- ``cutmix``: a box of another held-out image blended in (CutMix, Yun et al., ICCV 2019);
- ``draem``: a procedural texture (a sinusoidal grating or coloured fractal noise, never a photograph)
  blended into a Perlin-noise-shaped region (DRAEM's anomaly source, with procedural textures instead of DTD);
- ``perlin``: a Perlin-noise-shaped region darkened or brightened by a smooth fractal-noise profile (relative
  change 0.5-1 x the strength at every pixel of the region, exactly the strength at its peak).

Every anomaly has a severity ``s`` drawn uniformly from ``SEVERITY``; its region's area (a fraction of the
image, ``AREA``) and its strength (the blend factor, or for ``perlin`` the intensity change, ``STRENGTH``)
both grow linearly with ``s``, so the set spans subtle to obvious and the proxy does not sit at its ceiling.
``describe()`` is the record of these ranges that the checkpoint sidecar keeps; ``ANOMALY_VERSION`` changes
whenever a drawing rule does (it is part of a checkpoint's identity).

Everything is drawn on the image exactly as PatchCore sees it (resized, centre-cropped), from ``numpy``
generators seeded by ``(seed, image, kind)``. The mask is exactly the pixels that differ from the nominal
image: a pixel inside the region that the edit left unchanged (a faint blend, rounding) is nudged by one
grey level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.data.dataset import Sample
from core.data.images import read_image
from core.data.preprocessing import Preprocessing

ANOMALY_VERSION = "proxy-anomalies 3"
SYNTHETIC_KINDS = ("cutpaste", "cutmix", "draem", "perlin")
PASTE_KINDS = ("cutpaste", "cutmix")  # regions that are boxes
SEVERITY = (0.0, 1.0)  # drawn uniformly per anomaly
AREA = (0.003, 0.08)  # region area as a fraction of the image, at severity 0 and 1
STRENGTH = {  # at severity 0 and 1: blend factor of the new content (perlin: the largest intensity change)
    "cutpaste": (0.2, 1.0),
    "cutmix": (0.2, 1.0),
    "draem": (0.15, 1.0),
    "perlin": (0.08, 0.8),
}
BOX_RATIO = (0.3, 3.3)  # a box's aspect ratio w/h, log-uniform
CUTPASTE_JITTER = (0.8, 1.2)  # brightness factor of the pasted copy of the image itself
_BLOB_FILL = 0.45  # share of its window a noise-shaped region covers (sets the window's side)
_BORDER = 1 / 16  # regions keep this fraction of the side away from the image's edges


@dataclass
class SyntheticSet:
    """Held-out nominal images and their synthetic anomalies, all as uint8 ``[n, S, S, 3]`` crops."""

    nominal: torch.Tensor  # [N, S, S, 3] uint8
    anomalies: torch.Tensor  # [M, S, S, 3] uint8
    masks: torch.Tensor  # [M, S, S] bool
    kinds: list[str]  # per anomaly
    sources: list[int]  # per anomaly: the index of its nominal image
    severities: list[float]  # per anomaly, in SEVERITY

    def normalised(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """uint8 ``[n, S, S, 3]`` -> the float ``[n, 3, S, S]`` a backbone reads (the dataset's normalisation)."""
        x = images.permute(0, 3, 1, 2).float() / 255
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def check_kinds(kinds: Sequence[str]) -> list[str]:
    unknown = [kind for kind in kinds if kind not in SYNTHETIC_KINDS]
    if unknown or not kinds:
        raise ValueError(f"proxy.kinds={list(kinds)}: choose one or more of {list(SYNTHETIC_KINDS)} (the test "
                         "generator's scratch/hole/color/foreign are not proxy kinds: they would leak the test)")
    return list(kinds)


def describe(kinds: Sequence[str] = SYNTHETIC_KINDS) -> dict:
    """The families, severities and sizes of the proxy's anomalies: what a checkpoint's sidecar records."""
    return {"version": ANOMALY_VERSION, "kinds": list(kinds), "per_image": "one of each kind",
            "severity": list(SEVERITY), "severity_draw": "uniform per anomaly",
            "area_fraction": list(AREA), "strength": {kind: list(STRENGTH[kind]) for kind in kinds},
            "rule": "area and strength are linear in the severity (value at 0, value at 1)",
            "perlin_change": "0.5-1 x the strength at every pixel of the region (a smooth profile), exactly the "
                             "strength at its peak",
            "box_ratio": list(BOX_RATIO), "cutpaste_jitter": list(CUTPASTE_JITTER),
            "textures": "procedural (gratings, fractal Perlin noise); no photograph, no core/data/defects.py"}


def crop_uint8(sample: Sample, preprocessing: Preprocessing) -> np.ndarray:
    """The image as PatchCore sees it (resized, centre-cropped), before normalisation: uint8 ``[S, S, 3]``."""
    x = preprocessing.image(read_image(sample.path))
    mean, std = torch.tensor(preprocessing.mean).view(3, 1, 1), torch.tensor(preprocessing.std).view(3, 1, 1)
    unit = (x * std + mean).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def make_synthetic(samples: Sequence[Sample], preprocessing: Preprocessing, kinds: Sequence[str] = SYNTHETIC_KINDS,
                   seed: int = 0) -> SyntheticSet:
    """One anomaly of every kind for each held-out nominal sample (see the module docstring)."""
    kinds = check_kinds(kinds)
    if not samples:
        raise ValueError("no held-out images to make synthetic anomalies from (raise proxy.holdout)")
    crops = [crop_uint8(sample, preprocessing) for sample in samples]
    anomalies, masks, kind_of, source_of, severity_of = [], [], [], [], []
    for index, crop in enumerate(crops):
        for kind in kinds:
            rng = np.random.default_rng([seed, index, SYNTHETIC_KINDS.index(kind)])
            severity = float(rng.uniform(*SEVERITY))
            edited, region = draw(kind, crop, [c for i, c in enumerate(crops) if i != index], severity, rng)
            anomaly, mask = exact_mask(crop, edited, region)
            anomalies.append(anomaly)
            masks.append(mask)
            kind_of.append(kind)
            source_of.append(index)
            severity_of.append(severity)
    return SyntheticSet(torch.from_numpy(np.stack(crops)), torch.from_numpy(np.stack(anomalies)),
                        torch.from_numpy(np.stack(masks)), kind_of, source_of, severity_of)


def lerp(bounds: tuple[float, float], s: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * s


def draw(kind: str, image: np.ndarray, others: Sequence[np.ndarray], severity: float,
         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(float edited image, bool region) of one anomaly of ``kind`` at ``severity`` on uint8 ``image``."""
    size = image.shape[0]
    area = lerp(AREA, severity) * size * size
    strength = lerp(STRENGTH[kind], severity)
    base = image.astype(np.float32)
    if kind in PASTE_KINDS:
        same = kind == "cutpaste" or not others
        source = image if same else others[int(rng.integers(len(others)))]
        if same and kind == "cutmix":  # a single held-out image: its mirror stands in for another one
            source = np.ascontiguousarray(image[::-1, ::-1])
        patch, (y, x) = paste_box(source, area, rng, avoid_self=kind == "cutpaste")
        if kind == "cutpaste":
            patch = patch * rng.uniform(*CUTPASTE_JITTER)
        region = np.zeros(image.shape[:2], bool)
        region[y : y + patch.shape[0], x : x + patch.shape[1]] = True
        out = base.copy()
        out[region] = (1 - strength) * base[region] + strength * patch.reshape(-1, 3)
        return out, region
    region = noise_region(size, area, rng)
    if kind == "draem":
        texture = procedural_texture(size, rng, grey=is_grey(image), like=base)
        out = base.copy()
        out[region] = (1 - strength) * base[region] + strength * texture[region]
        return out, region
    if kind == "perlin":
        # Smooth, scaled over the region itself (not the whole image, whose noise range a small region only
        # samples a slice of): every pixel changes by 0.5-1 x strength, the peak by exactly strength.
        profile = 0.75 + 0.25 * normalise(fractal_noise(size, 2, 3, rng)[region])
        change = (strength * profile)[:, None]
        darker = rng.random() < 0.5
        inside = base[region]
        out = base.copy()
        out[region] = inside * (1 - change) if darker else inside + (255 - inside) * change
        return out, region
    raise ValueError(f"unknown synthetic kind {kind!r}: choose one of {list(SYNTHETIC_KINDS)}")


def paste_box(source: np.ndarray, area: float, rng: np.random.Generator,
              avoid_self: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """(float box of ``source`` of about ``area`` pixels, the (y, x) where it goes), both inside the border;
    with ``avoid_self`` the box is taken at least half a box away from where it goes along one axis."""
    size = source.shape[0]
    lo, hi = round(size * _BORDER), size - round(size * _BORDER)
    aspect = math.exp(rng.uniform(math.log(BOX_RATIO[0]), math.log(BOX_RATIO[1])))
    h = int(min((hi - lo) // 2, max(2, round(math.sqrt(area / aspect)))))
    w = int(min((hi - lo) // 2, max(2, round(math.sqrt(area * aspect)))))
    y, x = (int(rng.integers(lo, hi - n + 1)) for n in (h, w))
    while True:  # a box at most half the region wide always has a corner far enough away
        sy, sx = (int(rng.integers(lo, hi - n + 1)) for n in (h, w))
        if not avoid_self or abs(sy - y) * 2 >= h or abs(sx - x) * 2 >= w:
            break
    return source[sy : sy + h, sx : sx + w].astype(np.float32), (y, x)


def noise_region(size: int, area: float, rng: np.random.Generator) -> np.ndarray:
    """A Perlin-noise-shaped region of about ``area`` pixels: the top ``_BLOB_FILL`` of a noise window (its
    side set by the area) placed inside the border; never empty."""
    side = int(min(size - 2 * round(size * _BORDER), max(3, round(math.sqrt(area / _BLOB_FILL)))))
    noise = fractal_noise(side, int(rng.integers(2, 4)), 2, rng)
    ramp = np.minimum(np.arange(side), np.arange(side)[::-1]) / max(1, side / 4)  # fades towards the window's edge
    noise = noise - (1 - np.minimum(1, np.minimum.outer(ramp, ramp)))
    window = noise >= np.quantile(noise, 1 - _BLOB_FILL)
    lo, hi = round(size * _BORDER), size - round(size * _BORDER)
    y, x = (int(rng.integers(lo, hi - side + 1)) for _ in range(2))
    region = np.zeros((size, size), bool)
    region[y : y + side, x : x + side] = window
    return region


def perlin(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise on a ``size`` x ``size`` grid with ``cells`` lattice cells per side, about in
    [-0.7, 0.7]: random unit gradients at the lattice points, quintic fade (Perlin, SIGGRAPH 2002)."""
    angles = rng.uniform(0, 2 * np.pi, (cells + 1, cells + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    t = np.arange(size) * cells / size
    i, f = t.astype(int), t - t.astype(int)
    fade = f * f * f * (f * (f * 6 - 15) + 10)

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[i[:, None] + dy, i[None, :] + dx]
        return g[..., 0] * (f[:, None] - dy) + g[..., 1] * (f[None, :] - dx)

    u, v = fade[None, :], fade[:, None]
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return top * (1 - v) + bottom * v


def fractal_noise(size: int, cells: int, octaves: int, rng: np.random.Generator) -> np.ndarray:
    """Octaves of Perlin noise, each with twice the cells and half the amplitude of the one before."""
    return sum(0.5**o * perlin(size, cells * 2**o, rng) for o in range(octaves))


def normalise(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to [-1, 1] (a constant array -> zeros)."""
    span = float(x.max() - x.min())
    return (x - x.min()) * (2 / span) - 1 if span > 0 else np.zeros_like(x)


def is_grey(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def procedural_texture(size: int, rng: np.random.Generator, grey: bool, like: np.ndarray) -> np.ndarray:
    """A float ``[size, size, 3]`` texture: a sinusoidal grating (random orientation, 4-24 cycles across the
    image) or coloured fractal noise, at the brightness mean +- 2 std of ``like``; grey when ``grey``."""
    if rng.random() < 0.5:
        angle, cycles = rng.uniform(0, np.pi), rng.uniform(4, 24)
        yy, xx = np.mgrid[:size, :size] / size
        pattern = np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        channels = np.stack([pattern * rng.choice([-1, 1]) for _ in range(3)], axis=-1)
    else:
        channels = np.stack([normalise(fractal_noise(size, int(rng.integers(4, 12)), 3, rng)) for _ in range(3)],
                            axis=-1)
    if grey:
        channels = np.repeat(channels[..., :1], 3, axis=-1)
    mean, std = float(like.mean()), float(like.std()) + 8.0
    return np.clip(mean + 2 * std * channels, 0, 255).astype(np.float32)


def exact_mask(image: np.ndarray, edited: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 anomaly, bool mask): the edit rounded into ``image`` inside ``region``; a pixel inside that is
    unchanged after rounding is nudged by one grey level, so the mask is exactly the pixels that differ."""
    out = image.copy()
    out[region] = np.clip(edited[region], 0, 255).round().astype(np.uint8)
    same = region & np.all(out == image, axis=-1)
    out[same] = np.where(image[same] < 128, image[same] + 1, image[same] - 1)
    return out, region.copy()
