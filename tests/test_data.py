"""Tests of core.data: sample discovery, preprocessing, errors and configs (embedded textures: test_textures.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import ListConfig, OmegaConf
from PIL import Image

from core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    DatasetError,
    MVTecLayout,
    Preprocessing,
    Sample,
    TexturesLayout,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


# --------------------------------------------------------------------------- tiny MVTec trees


def write_image(path: Path, size=(40, 30), value=128, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def write_mask(path: Path, size=(40, 30), box=(5, 5, 15, 15), on=255) -> Path:
    arr = np.zeros(size[::-1], np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = on
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """widget: train/good (3 + junk), test/good (2), crack (`_mask` masks), hole (same-stem .bmp masks),
    stain (no masks); gadget: a second, minimal category."""
    cat = tmp_path / "widget"
    for name in ("b.png", "a.PNG", "c.jpg"):
        write_image(cat / "train" / "good" / name)
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    (cat / "train" / "good" / "._a.png").write_bytes(b"macos resource fork")
    for name in ("000.png", "001.png"):
        write_image(cat / "test" / "good" / name)
        write_image(cat / "test" / "crack" / name)
        write_mask(cat / "ground_truth" / "crack" / name.replace(".png", "_mask.png"))
        write_image(cat / "test" / "hole" / name)
        write_mask(cat / "ground_truth" / "hole" / name.replace(".png", ".bmp"), on=1)
    write_image(cat / "test" / "stain" / "000.png")
    write_image(tmp_path / "gadget" / "train" / "good" / "0.png")
    write_image(tmp_path / "gadget" / "test" / "good" / "0.png")
    (tmp_path / "not_a_category").mkdir()
    return tmp_path


def layout(root: Path, **kw) -> MVTecLayout:
    return MVTecLayout("mvtec", root, **kw)


# --------------------------------------------------------------------------- discovery


def test_train_samples_sorted_images_only(tree):
    samples = layout(tree).train_samples("widget")
    assert [s.path.name for s in samples] == ["a.PNG", "b.png", "c.jpg"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in samples)


def test_test_samples_labels_types_and_masks(tree):
    with pytest.warns(UserWarning, match="stain"):
        samples = layout(tree).test_samples("widget")
    by = {(s.defect_type, s.path.name): s for s in samples}
    assert [s.defect_type for s in samples] == ["crack"] * 2 + ["good"] * 2 + ["hole"] * 2 + ["stain"]
    assert all(s.label == (s.defect_type != "good") for s in samples)
    gt = tree / "widget" / "ground_truth"
    assert by["crack", "001.png"].mask_path == gt / "crack" / "001_mask.png"
    assert by["hole", "000.png"].mask_path == gt / "hole" / "000.bmp"
    assert by["good", "000.png"].mask_path is None
    assert by["stain", "000.png"].mask_path is None


def test_missing_masks_warn_and_have_no_mask(tree):
    with pytest.warns(UserWarning) as record:
        ds = layout(tree).test_set("widget", Preprocessing(32, 24))
    (msg,) = [str(w.message) for w in record]
    assert str(tree / "widget" / "test" / "stain") in msg and "pixel metrics will be skipped" in msg
    items = {(it["defect_type"], Path(it["path"]).name): it for it in (ds[i] for i in range(len(ds)))}
    assert items["stain", "000.png"]["has_mask"] is False
    assert items["good", "000.png"]["has_mask"] is True
    assert items["hole", "000.png"]["has_mask"] is True and items["hole", "000.png"]["label"] == 1
    assert items["crack", "000.png"]["mask"].sum() > 0 and items["good", "000.png"]["mask"].sum() == 0
    assert items["stain", "000.png"]["mask"].sum() == 0


def test_mask_prefers_mask_suffix_over_same_stem(tmp_path):
    cat = tmp_path / "c"
    write_image(cat / "train" / "good" / "0.png")
    write_image(cat / "test" / "bad" / "7.png")
    write_mask(cat / "ground_truth" / "bad" / "7.png")
    write_mask(cat / "ground_truth" / "bad" / "7_mask.tif")
    (sample,) = layout(tmp_path).test_samples("c")
    assert sample.mask_path.name == "7_mask.tif"


def test_resolve_categories(tree):
    ds = layout(tree, categories=["widget", "gadget"])
    assert ds.resolve_categories("all") == ["widget", "gadget"]
    assert ds.resolve_categories("gadget") == ["gadget"]
    assert ds.resolve_categories(ListConfig(["gadget", "widget"])) == ["gadget", "widget"]
    with pytest.raises(DatasetError) as err:
        ds.resolve_categories(["widget", "bottle"])
    assert "bottle" in str(err.value) and "'widget'" in str(err.value) and "'gadget'" in str(err.value)


def test_folder_discovers_categories_with_train_good(tree):
    assert MVTecLayout("folder", tree).available_categories() == ["gadget", "widget"]


# --------------------------------------------------------------------------- preprocessing


def square_pair(mask_on: int) -> tuple[Image.Image, Image.Image]:
    """300x200 black image with a white square x,y in [100,150): shorter-side scale 256/200 = 1.28
    puts it at [128,192) x [64,128); the 224 crop starts at (80, 16), so it lands at [48,112)^2."""
    img = np.zeros((200, 300, 3), np.uint8)
    img[50:100, 100:150] = 255
    mask = (img[..., 0] > 0).astype(np.uint8) * mask_on
    return Image.fromarray(img), Image.fromarray(mask)


@pytest.mark.parametrize("mask_on", [255, 1])
def test_resize_crop_image_and_mask_aligned(mask_on):
    pre = Preprocessing(mean=(0, 0, 0), std=(1, 1, 1))
    img, mask = square_pair(mask_on)
    x, m = pre.image(img), pre.mask(mask)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert m.shape == (1, 224, 224) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    expected = torch.zeros(224, 224)
    expected[48:112, 48:112] = 1
    assert torch.equal(m[0], expected)
    white = x[0] > 0.5  # the bilinear image agrees with the mask up to its soft edges
    assert (white == expected.bool()).float().mean() > 0.995
    assert x[:, 80, 80].min() > 0.99 and x[:, 10, 200].max() < 0.01


def test_mask_none_is_zeros_and_rgb_alpha_masks():
    pre = Preprocessing(resize=32, image_size=24)
    assert torch.equal(pre.mask(None), torch.zeros(1, 24, 24))
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255  # an opaque alpha band alone is no defect
    rgba[4:8, 4:8, 1] = 255
    m = pre.mask(Image.fromarray(rgba, "RGBA"))
    assert m.sum() == 16 and m[0, 0:4, 0:4].sum() == 16  # [4,8) shifted by the 4 px crop offset


def test_normalisation_by_hand():
    x = Preprocessing(resize=32, image_size=16).image(Image.new("RGB", (50, 40), (255, 0, 128)))
    expected = [
        (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
        (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
        (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
    ]
    assert torch.allclose(x, torch.tensor(expected)[:, None, None].expand(3, 16, 16), atol=1e-5)


@pytest.mark.parametrize(
    "img",
    [
        Image.new("L", (40, 30), 100),
        Image.new("RGBA", (40, 30), (100, 100, 100, 7)),
        Image.fromarray(np.full((30, 40), 100 * 257, np.uint16)),  # 16-bit: scaled, not clipped
    ],
    ids=["gray", "rgba", "16bit"],
)
def test_other_modes_become_rgb(img):
    pre = Preprocessing(resize=32, image_size=24, mean=(0, 0, 0), std=(1, 1, 1))
    x = pre.image(img)
    assert x.shape == (3, 24, 24)
    assert torch.allclose(x, torch.full_like(x, 100 / 255), atol=1 / 255)


def test_preprocessing_settings_validated():
    assert Preprocessing(interpolation="bicubic").image(Image.new("RGB", (300, 300))).shape == (3, 224, 224)
    with pytest.raises(DatasetError, match="interpolation"):
        Preprocessing(interpolation="lanczos")
    with pytest.raises(DatasetError, match=r"dataset\.image_size"):
        Preprocessing(resize=200, image_size=224)
    pre = MVTecLayout("x", "nowhere", resize=64, image_size=48).preprocessing([0.5] * 3, [0.25] * 3)
    assert pre == Preprocessing(64, 48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")


# --------------------------------------------------------------------------- train_limit


def test_train_limit_seeded_subset(tmp_path):
    for i in range(20):
        write_image(tmp_path / "c" / "train" / "good" / f"{i:02d}.png", size=(4, 4))
    ds = layout(tmp_path, train_limit=5)
    a, b, c = (ds.train_samples("c", seed=s) for s in (0, 0, 1))
    assert len(a) == 5 and a == b and a != c
    assert [s.path for s in a] == sorted(s.path for s in a)
    assert len(layout(tmp_path, train_limit=20).train_samples("c")) == 20
    assert len(layout(tmp_path, train_limit=99).train_samples("c", seed=3)) == 20


@pytest.mark.parametrize("limit", [0, -3])
def test_train_limit_must_be_positive(limit):
    with pytest.raises(DatasetError, match=r"dataset\.train_limit"):
        layout(Path("anywhere"), train_limit=limit)


# --------------------------------------------------------------------------- errors


def test_missing_root(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DatasetError) as err:
        MVTecLayout("btad", root, categories=["01"]).train_samples("01")
    msg = str(err.value)
    assert str(root) in msg and "dataset.root=" in msg and "BTAD_ROOT" in msg
    assert "train/good" in msg and "ground_truth/<defect_type>" in msg
    with pytest.raises(DatasetError, match="FOLDER_ROOT"):
        MVTecLayout("folder", root).available_categories()


def test_missing_category_folder(tree):
    with pytest.raises(DatasetError, match="does not exist") as err:
        layout(tree, categories=["widget", "bottle"]).test_samples("bottle")
    assert str(tree / "bottle") in str(err.value)


def test_empty_or_missing_train_good(tree):
    (tree / "empty" / "train" / "good").mkdir(parents=True)
    for category in ("empty", "not_a_category"):
        with pytest.raises(DatasetError, match="no training images") as err:
            layout(tree).train_samples(category)
        assert str(tree / category / "train" / "good") in str(err.value)
        assert "dataset.good_dirname" in str(err.value)


def test_no_test_images(tree):
    (tree / "gadget" / "test" / "good" / "0.png").unlink()
    with pytest.raises(DatasetError, match="no test images") as err:
        layout(tree).test_samples("gadget")
    assert str(tree / "gadget" / "test") in str(err.value)
    with pytest.raises(DatasetError, match="no test images"):
        layout(tree).test_samples("not_a_category")  # no test/ at all


def test_corrupt_image_names_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = AnomalyDataset([Sample(bad, 0, "good", None)], Preprocessing())
    with pytest.raises(DatasetError) as err:
        ds[0]
    assert str(bad) in str(err.value)


def test_mask_size_mismatch_names_both(tmp_path):
    img = write_image(tmp_path / "a.png", size=(40, 30))
    mask = write_mask(tmp_path / "a_mask.png", size=(20, 15))
    ds = AnomalyDataset([Sample(img, 1, "crack", mask)], Preprocessing(32, 24))
    with pytest.raises(DatasetError) as err:
        ds[0]
    assert str(img) in str(err.value) and str(mask) in str(err.value)


# --------------------------------------------------------------------------- Hydra configs


@pytest.mark.parametrize(
    "name, env, n_categories, good",
    [
        ("mvtec", "MVTEC_ROOT", 15, "good"),
        ("btad", "BTAD_ROOT", 3, "ok"),
        ("visa", "VISA_ROOT", 12, "good"),
        ("folder", "FOLDER_ROOT", None, "good"),
        ("textures", "TEXTURES_ROOT", 4, "good"),
    ],
)
def test_configs_instantiate(name, env, n_categories, good, monkeypatch, tmp_path):
    monkeypatch.setenv(env, str(tmp_path / name))
    ds = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert isinstance(ds, TexturesLayout if name == "textures" else MVTecLayout)
    assert (ds.name, ds.root, ds.good_dirname) == (name, tmp_path / name, good)
    assert (ds.resize, ds.image_size, ds.train_limit) == (256, 224, None)
    if n_categories is not None:
        assert len(ds.categories) == n_categories and all(isinstance(c, str) for c in ds.categories)
    if name == "btad":
        assert ds.categories == ["01", "02", "03"]
    assert not (tmp_path / name).exists()  # instantiating touches no files
