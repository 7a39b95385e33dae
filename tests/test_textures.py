"""Tests of the embedded textures set: its sizes, graded severities and their sidecar, determinism,
regeneration on a version bump, and the balanced test subset (``dataset.test_limit``)."""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import core.data.textures as textures_module
from core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEXTURE_DEFECTS,
    TEXTURE_SOURCES,
    TEXTURES_STAMP,
    DatasetError,
    Sample,
    TexturesLayout,
    generate_textures,
)
from core.data.defects import BLOB_RADIUS, CONTRAST, defect_contrast, make_defect, photo_crop
from core.data.textures import (
    DEFECT_STRENGTH,
    N_PER_DEFECT,
    N_TEST_GOOD,
    N_TRAIN,
    SEVERITY_COLUMNS,
    SEVERITY_SIDECAR,
    TEXTURES_VERSION,
    balanced_subset,
)

SMALL = {"n_train": 2, "n_test_good": 1, "n_per_defect": 1}
SMALL_FILES = 2 + 1 + 2 * len(TEXTURE_DEFECTS) + 1  # per category: train, test good, defects + masks, sidecar


@pytest.fixture(scope="module")
def textures(textures_root) -> TexturesLayout:
    return TexturesLayout(root=textures_root)


def read_sidecar(layout: TexturesLayout, category: str) -> list[dict[str, str]]:
    with open(layout.root / category / "test" / SEVERITY_SIDECAR, newline="") as f:
        return list(csv.DictReader(f))


def test_categories_known_before_generation(tmp_path):
    ds = TexturesLayout(root=tmp_path / "textures")
    assert ds.resolve_categories("all") == ["brick", "grass", "gravel", "tissue"]
    assert not ds.root.exists()


def test_sizes_resolve_differences():
    # The floor: one image-AUROC step at most 0.02 points, at least 100 training images.
    assert N_TEST_GOOD >= 50 and N_PER_DEFECT * len(TEXTURE_DEFECTS) >= 100 and N_TRAIN >= 100
    assert 100 / (N_TEST_GOOD * N_PER_DEFECT * len(TEXTURE_DEFECTS)) <= 0.02


def test_textures_layout_complete(textures):
    for category in TEXTURE_SOURCES:
        assert len(textures.train_samples(category)) == N_TRAIN
        test = textures.test_samples(category)
        types = [s.defect_type for s in test]
        assert types.count("good") == N_TEST_GOOD
        assert all(types.count(k) == N_PER_DEFECT for k in TEXTURE_DEFECTS)
        assert len(test) == N_TEST_GOOD + N_PER_DEFECT * len(TEXTURE_DEFECTS)
        assert all(s.mask_path.name == f"{s.path.stem}_mask.png" for s in test if s.label)
    with Image.open(textures.train_samples("grass")[0].path) as img:
        assert (img.mode, img.size) == ("RGB", (256, 256))


def test_textures_masks_nonempty_binary_inside_crop(textures):
    for category in TEXTURE_SOURCES:
        for s in textures.test_samples(category):
            if not s.label:
                continue
            mask = np.asarray(Image.open(s.mask_path))
            assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
            inside = np.zeros_like(mask, bool)
            inside[16:240, 16:240] = True
            assert (mask[~inside] == 0).all()
            assert 30 <= (mask > 0).sum() <= 60 * 60


def test_sidecar_lists_every_defect_with_its_severity_level_and_area(textures):
    for category in TEXTURE_SOURCES:
        rows = read_sidecar(textures, category)
        assert list(rows[0]) == list(SEVERITY_COLUMNS)
        defects = [s for s in textures.test_samples(category) if s.label]
        cat_dir = textures.root / category
        assert sorted(r["file"] for r in rows) == sorted(str(s.path.relative_to(cat_dir)) for s in defects)
        for row, sample in zip(sorted(rows, key=lambda r: r["file"]),
                               sorted(defects, key=lambda s: str(s.path)), strict=True):
            severity = float(row["severity"])
            assert row["defect_type"] == sample.defect_type
            assert row["level"] == ("subtle" if severity < 1 / 3 else "medium" if severity < 2 / 3 else "obvious")
            assert int(row["area_px"]) == (np.asarray(Image.open(sample.mask_path)) > 0).sum()
            # contrast: CONTRAST[kind] at the severity, times the category's strength, at most 1
            low, high = CONTRAST[sample.defect_type]
            by_hand = min(1.0, DEFECT_STRENGTH[category] * (low + (high - low) * severity))
            assert float(row["contrast"]) == pytest.approx(by_hand, abs=5e-5)


def test_severities_span_the_range_evenly_per_kind(textures):
    # Stratified: the i-th defect of a kind lies in [i/n, (i+1)/n], so each kind covers subtle to obvious.
    n = N_PER_DEFECT
    for category in TEXTURE_SOURCES:
        rows = read_sidecar(textures, category)
        for kind in TEXTURE_DEFECTS:
            severities = {Path(r["file"]).stem: float(r["severity"]) for r in rows if r["defect_type"] == kind}
            assert sorted(severities) == [f"{i:03d}" for i in range(n)]
            assert all(i / n <= severities[f"{i:03d}"] <= (i + 1) / n for i in range(n)), (category, kind)
            levels = [r["level"] for r in rows if r["defect_type"] == kind]
            assert {lv: levels.count(lv) for lv in set(levels)}.keys() == {"subtle", "medium", "obvious"}


def test_larger_severity_means_larger_defects(textures):
    for category in TEXTURE_SOURCES:
        rows = read_sidecar(textures, category)
        for kind in TEXTURE_DEFECTS:
            of_kind = [r for r in rows if r["defect_type"] == kind]
            area = {lv: np.mean([int(r["area_px"]) for r in of_kind if r["level"] == lv]) for lv in ("subtle",
                                                                                                    "obvious")}
            assert area["obvious"] > 2 * area["subtle"], (category, kind, area)


@pytest.mark.parametrize("severity, expected", [(0.0, 151), (0.5, 90), (1.0, 28)])
def test_severity_sets_the_contrast_and_the_size(severity, expected):
    # A hole on flat grey 200 keeps (1 - w) of it plus 5 w, w the darkening at that severity, by hand:
    # s=0: w=0.25, 150 + 1.25 -> 151; s=0.5: w=0.565, 87 + 2.825 -> 90; s=1: w=0.88, 24 + 4.4 -> 28.
    assert CONTRAST["hole"] == (0.25, 0.88)
    flat = np.full((256, 256, 3), 200, np.uint8)
    image, mask = make_defect("hole", flat, np.random.default_rng(0), flat, severity)
    assert (image[mask] == expected).all() and (image[~mask] == 200).all()
    # the blob's radius is BLOB_RADIUS at that severity, +-15 %, stretched and wobbled by at most a third
    radius = BLOB_RADIUS[0] + (BLOB_RADIUS[1] - BLOB_RADIUS[0]) * severity
    assert 0.4 * np.pi * radius**2 <= mask.sum() <= 2.2 * np.pi * radius**2


def test_severity_or_strength_outside_the_range_refused():
    flat = np.full((256, 256, 3), 100, np.uint8)
    with pytest.raises(ValueError, match="severity 1.5"):
        make_defect("color", flat, np.random.default_rng(0), flat, 1.5)
    with pytest.raises(ValueError, match="strength 0.0"):
        make_defect("color", flat, np.random.default_rng(0), flat, 0.5, 0.0)


def test_strength_scales_the_contrast_up_to_one():
    # by hand: colour at s=0.5 blends lerp((0.12, 0.6), 0.5) = 0.36 of the tint; x0.5 -> 0.18; x2 -> 0.72;
    # scratch at s=1 weighs 1.0, x1.6 stays 1
    assert defect_contrast("color", 0.5) == pytest.approx(0.36)
    assert defect_contrast("color", 0.5, 0.5) == pytest.approx(0.18)
    assert defect_contrast("color", 0.5, 2.0) == pytest.approx(0.72)
    assert defect_contrast("scratch", 1.0, 1.6) == 1.0


def test_textures_defects_survive_preprocessing(textures):
    ds = textures.test_set("tissue", textures.preprocessing(IMAGENET_MEAN, IMAGENET_STD))
    items = [ds[i] for i in range(0, len(ds), 5)]
    assert any(it["label"] for it in items) and not all(it["label"] for it in items)
    assert all(it["has_mask"] for it in items)
    assert all((it["mask"].sum() > 0) == bool(it["label"]) for it in items)


@pytest.mark.parametrize("severity", [0.0, 1.0])
@pytest.mark.parametrize("kind", TEXTURE_DEFECTS)
def test_defect_mask_is_exactly_the_changed_pixels(kind, severity):
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.new("RGB", (512, 512), (6, 6, 6)))  # a "hole" maps 6 to 6
    foreign = np.asarray(Image.new("RGB", (512, 512), (6, 6, 6)))  # same as base: pasting changes nothing
    for _ in range(3):
        base = photo_crop(photo, rng)
        image, mask = make_defect(kind, base, rng, foreign, severity)
        assert mask.any()
        assert np.array_equal(np.any(image != base, axis=-1), mask)


# The pixels and sidecars of generate_textures(root, 2, 1, 1), every category, as made by "textures-generator 2".
# A change here regenerates everyone's data/textures: bump TEXTURES_VERSION then.
PINNED_TEXTURES = "db79444f5a509afa76bc9c6d8e2b94689ec7d9838c0fce53199463b3ab382d05"


def test_generated_textures_pixels_are_pinned(tmp_path):
    assert TEXTURES_VERSION == "textures-generator 2"
    generate_textures(tmp_path, **SMALL)
    digest = hashlib.sha256()
    paths = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(paths) == len(TEXTURE_SOURCES) * SMALL_FILES
    for path in paths:
        digest.update(str(path.relative_to(tmp_path)).encode())
        digest.update(np.asarray(Image.open(path)).tobytes() if path.suffix == ".png" else path.read_bytes())
    assert digest.hexdigest() == PINNED_TEXTURES


def test_textures_deterministic(tmp_path):
    a = TexturesLayout(root=tmp_path / "a", categories=["gravel"], **SMALL)
    b = TexturesLayout(root=tmp_path / "b", categories=["gravel"], **SMALL)
    a.train_samples("gravel"), b.train_samples("gravel")
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert len(files) == len(TEXTURE_SOURCES) * SMALL_FILES + 1
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    for rel in files:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.slow
def test_textures_deterministic_at_full_size(tmp_path, textures):
    # A fresh full-size generation equals the session's copy byte for byte, on a sample of files.
    again = TexturesLayout(root=tmp_path / "again", categories=["brick"])
    again.ensure()
    for rel in ["brick/train/good/099.png", "brick/test/good/049.png", "grass/test/foreign/024.png",
                "tissue/ground_truth/scratch/000_mask.png", f"gravel/test/{SEVERITY_SIDECAR}", TEXTURES_STAMP]:
        assert (again.root / rel).read_bytes() == (textures.root / rel).read_bytes(), rel


def test_textures_reuses_current_copy(textures):
    files = [textures.root / TEXTURES_STAMP, textures.train_samples("brick")[0].path]
    before = [os.stat(p).st_mtime_ns for p in files]
    again = TexturesLayout(root=textures.root)
    assert len(again.test_samples("grass")) == N_TEST_GOOD + N_PER_DEFECT * len(TEXTURE_DEFECTS)
    assert [os.stat(p).st_mtime_ns for p in files] == before


def test_textures_refuses_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "precious.png")
    with pytest.raises(DatasetError) as err:
        TexturesLayout(root=root, **SMALL).train_samples("brick")
    msg = str(err.value)
    assert str(root) in msg and TEXTURES_STAMP in msg and "TEXTURES_ROOT" in msg
    assert [p.name for p in root.iterdir()] == ["precious.png"]


def test_textures_regenerates_old_or_other_size_copy(tmp_path):
    root = tmp_path / "t"
    TexturesLayout(root=root, **SMALL).train_samples("brick")
    (root / TEXTURES_STAMP).write_text("textures-generator 0\n")
    (root / "brick" / "leftover.txt").write_text("from an old version")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bigger = TexturesLayout(root=root, n_train=3, n_test_good=1, n_per_defect=1)
        assert len(bigger.train_samples("brick")) == 3
    assert not (root / "brick" / "leftover.txt").exists()
    assert "n_train=3" in (root / TEXTURES_STAMP).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def old_generated_copy(root: Path) -> None:
    """What version 1 left behind: its stamp and a tree with no severity sidecar."""
    (root / "brick" / "train" / "good").mkdir(parents=True)
    Image.new("RGB", (256, 256)).save(root / "brick" / "train" / "good" / "000.png")
    (root / TEXTURES_STAMP).write_text("textures-generator 1 n_train=40 n_test_good=15 n_per_defect=6\n")


def test_version_bump_regenerates_keeping_the_neighbours(tmp_path):
    root = tmp_path / "data" / "textures"
    old_generated_copy(root)
    (tmp_path / "data" / "mvtec").mkdir()
    (tmp_path / "data" / "mvtec" / "keep.txt").write_text("someone else's data")
    layout = TexturesLayout(root=root, **SMALL)
    assert len(layout.train_samples("brick")) == 2
    assert (root / TEXTURES_STAMP).read_text().startswith(f"{TEXTURES_VERSION} ")
    assert (root / "grass" / "test" / SEVERITY_SIDECAR).is_file()
    assert (tmp_path / "data" / "mvtec" / "keep.txt").read_text() == "someone else's data"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["mvtec", "textures"]


def test_failed_regeneration_keeps_the_old_copy_whole(tmp_path, monkeypatch):
    root = tmp_path / "textures"
    old_generated_copy(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def fail_midway(out, *args, **kwargs):
        (out / "brick").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(textures_module, "generate_textures", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        TexturesLayout(root=root, **SMALL).ensure()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["textures"]  # no temporary folder left


def test_textures_unknown_category():
    with pytest.raises(DatasetError, match="brick"):
        TexturesLayout(root="unused", categories=["marble"])


# --------------------------------------------------------------------------- test_limit


def samples(n_good: int, per_kind: dict[str, int]) -> list[Sample]:
    out = [Sample(Path(f"good/{i}.png"), 0, "good", None) for i in range(n_good)]
    for kind, n in per_kind.items():
        out += [Sample(Path(f"{kind}/{i}.png"), 1, kind, Path(f"gt/{kind}/{i}.png")) for i in range(n)]
    return out


def test_balanced_subset_halves_and_spreads_over_kinds():
    full = samples(10, {"a": 5, "b": 5, "c": 5})
    picked = balanced_subset(full, 9)
    types = [s.defect_type for s in picked]
    # 9 // 2 = 4 nominal; the other 5 over three kinds: 2, 2, 1 (the first kinds by name take the remainder).
    assert [types.count(t) for t in ("good", "a", "b", "c")] == [4, 2, 2, 1]
    assert picked == [s for s in full if s in picked]  # a subset, in the order given
    assert balanced_subset(full, 9) == picked  # seeded


def test_balanced_subset_caps_at_what_a_kind_has():
    # 12 // 2 = 6 nominal wanted, 3 there; the other 9: a 5 (capped at its 1), b 4; nothing is redistributed
    picked = balanced_subset(samples(3, {"a": 1, "b": 10}), 12)
    types = [s.defect_type for s in picked]
    assert [types.count(t) for t in ("good", "a", "b")] == [3, 1, 4]


def test_test_limit_on_the_layout(textures):
    limited = TexturesLayout(root=textures.root, test_limit=30)
    picked = limited.test_samples("gravel")
    types = [s.defect_type for s in picked]
    assert [types.count(t) for t in ("good", *sorted(TEXTURE_DEFECTS))] == [15, 4, 4, 4, 3]
    full = textures.test_samples("gravel")
    assert all(s in full for s in picked)
    assert TexturesLayout(root=textures.root, test_limit=10_000).test_samples("gravel") == full


@pytest.mark.parametrize("limit", [0, 1, -3])
def test_test_limit_below_two_refused(limit):
    with pytest.raises(DatasetError, match=f"dataset.test_limit={limit}"):
        TexturesLayout(root="unused", test_limit=limit)
