"""Synthetic local defects with exact masks, on a 256 x 256 uint8 canvas, graded by a severity in [0, 1].

One home for the defect drawing of the embedded dataset's generator (core/data/textures.py), whose test
images these defects are. Each defect has a severity ``s``: 0 is the subtle end (small, low contrast), 1 the
obvious end (large, full contrast); size and contrast both grow linearly with ``s`` (the ranges are the
constants below), so results can be broken down by how visible a defect is. Every function draws from the
``numpy`` generator it is given, in a fixed order, so a seeded caller gets the same bytes every time (the
embedded dataset depends on it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

DEFECT_KINDS = ("scratch", "hole", "color", "foreign")
CANVAS = 256  # canvas side: the generated image size
CROP_LO, CROP_HI = 16, 240  # the central 224 x 224 region that the default centre crop keeps; defects stay inside
_TINTS = np.array([(220, 40, 40), (40, 190, 60), (50, 80, 230), (235, 205, 30)], dtype=np.float32)

# What a severity s in [0, 1] sets: (value at s=0, value at s=1), interpolated linearly.
BLOB_RADIUS = (6.0, 18.0)  # px; a blob is about 2 x radius across (times a 0.85-1.15 jitter and the wobble)
SCRATCH_LENGTH = (25.0, 70.0)  # px
SCRATCH_WIDTH = (2.0, 5.0)  # px, rounded
CONTRAST = {  # the edit's strength per kind: the blend weight of the new content (hole: the darkening)
    "scratch": (0.25, 1.0),  # weight of the dark or bright line over the texture
    "hole": (0.25, 0.88),  # fraction of the brightness removed
    "color": (0.12, 0.6),  # weight of the tint
    "foreign": (0.3, 1.0),  # weight of the foreign texture
}


def lerp(bounds: tuple[float, float], s: float) -> float:
    """The value that severity ``s`` gives on a (subtle, obvious) range."""
    return bounds[0] + (bounds[1] - bounds[0]) * s


def defect_contrast(kind: str, severity: float, strength: float = 1.0) -> float:
    """The edit's blend weight: ``CONTRAST[kind]`` at ``severity``, times ``strength`` in (0, 2] (a texture on
    which every defect stands out takes a lower one, a busy texture a higher one), at most 1."""
    if not 0.0 < strength <= 2.0:
        raise ValueError(f"defect strength {strength} is outside (0, 2]")
    return min(1.0, strength * lerp(CONTRAST[kind], severity))


def photo_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 160-200 px crop of ``photo``, maybe flipped, brightness jittered by 5%, as uint8 256 x 256 x 3
    (a nominal image of the embedded set, and the texture a ``foreign`` defect pastes in)."""
    side = int(rng.integers(160, 201))
    y, x = (int(rng.integers(0, n - side + 1)) for n in photo.shape[:2])
    crop = photo[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((CANVAS, CANVAS), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img, np.float32) * rng.uniform(0.95, 1.05), 0, 255).round().astype(np.uint8)


def make_defect(
    kind: str, base: np.ndarray, rng: np.random.Generator, foreign: np.ndarray, severity: float,
    strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(defect image, bool mask) where the mask is exactly the pixels that differ from ``base``; ``foreign`` is
    the photograph a ``foreign`` defect takes its texture from; ``severity`` in [0, 1] sets size and contrast;
    ``strength`` scales the contrast (``defect_contrast``)."""
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}: choose one of {list(DEFECT_KINDS)}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"defect severity {severity} is outside [0, 1]")
    region = scratch_region(rng, severity) if kind == "scratch" else blob_region(rng, severity)
    weight = defect_contrast(kind, severity, strength)
    img = base.astype(np.float32)
    if kind == "scratch":  # thin dark or bright line; the other shade where it would not contrast
        under = img[region].mean()
        dark = under > 90 if rng.random() < 0.5 else under > 165
        shade = rng.uniform(5, 30) if dark else rng.uniform(225, 250)
        img[region] = (1 - weight) * img[region] + weight * shade
    elif kind == "hole":  # dark cavity that keeps a trace of the texture
        img[region] = img[region] * (1 - weight) + 5 * weight
    elif kind == "color":  # tint
        img[region] = (1 - weight) * img[region] + weight * _TINTS[rng.integers(len(_TINTS))]
    else:  # foreign: another texture blended in
        img[region] = (1 - weight) * img[region] + weight * photo_crop(foreign, rng)[region]
    out = np.clip(img, 0, 255).round().astype(np.uint8)
    # A pixel the edit left unchanged (e.g. darkening a black pixel) is nudged by one grey level
    # so that the mask stays exactly the changed pixels.
    same = region & np.all(out == base, axis=-1)
    out[same] = np.where(base[same] < 128, base[same] + 1, base[same] - 1)
    return out, region


def blob_region(rng: np.random.Generator, severity: float = 1.0) -> np.ndarray:
    """A wobbly ellipse of radius ``BLOB_RADIUS`` at ``severity`` (+-15%), wholly inside the central 224 crop."""
    radius = lerp(BLOB_RADIUS, severity) * rng.uniform(0.85, 1.15)
    stretch = rng.uniform(0.75, 1.33)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = 1 + sum(rng.uniform(-0.15, 0.15) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    reach = radius * 1.3 * 1.33 + 4  # the farthest a vertex can be from the centre, plus a margin
    cx, cy = rng.uniform(CROP_LO + reach, CROP_HI - reach, size=2)
    xs = cx + radius * wobble * np.cos(theta) * stretch
    ys = cy + radius * wobble * np.sin(theta) / stretch
    return _region(lambda d: d.polygon(list(zip(xs, ys, strict=True)), fill=255))


def scratch_region(rng: np.random.Generator, severity: float = 1.0) -> np.ndarray:
    """A curved line (quadratic Bezier) of ``SCRATCH_LENGTH`` (+-15%) and ``SCRATCH_WIDTH`` at ``severity``,
    inside the central 224 crop."""
    length = lerp(SCRATCH_LENGTH, severity) * rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(CROP_LO + length / 2 + 8, CROP_HI - length / 2 - 8, size=2)
    p0, p2 = centre - direction * length / 2, centre + direction * length / 2
    p1 = centre + normal * rng.uniform(-0.35, 0.35) * length
    t = np.linspace(0, 1, 32)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = int(round(lerp(SCRATCH_WIDTH, severity)))
    return _region(lambda d: d.line([tuple(p) for p in points], fill=255, width=width, joint="curve"))


def _region(paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0
