"""The Python API (issue 16): ``core.api.prepare_images`` turns paths, numpy arrays and PIL images of any size
into exactly the model's own preprocessing, ``PatchCore.predict_images`` returns scores, maps and masks at
each input's resolution and decisions, bad inputs are refused by position, and the example in
docs/deployment.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from core.api import CropGeometry, ImageInputError, crop_uint8, normalize, prepare_images, prepare_images_uint8
from core.backbones import TorchvisionCNN
from core.data import DatasetError, Preprocessing
from core.features import PatchEmbedder
from core.patchcore import PatchCore

REPO = Path(__file__).resolve().parents[1]
PREPROCESSING = Preprocessing(resize=40, image_size=32)


class _Model:  # anything with a ``preprocessing`` attribute
    preprocessing = PREPROCESSING


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16"])
@pytest.mark.parametrize("size", [(40, 40), (57, 83), (120, 45)])
def test_uint8_crop_then_normalise_is_the_models_preprocessing_exactly(mode, size) -> None:
    image = Image.fromarray(_rgb(*size)).convert("RGBA" if mode == "RGBA" else "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    for preprocessing in (PREPROCESSING, Preprocessing(resize=48, image_size=48, interpolation="bicubic")):
        crop = crop_uint8(image, preprocessing)
        assert crop.dtype == torch.uint8 and crop.shape == (3, preprocessing.image_size, preprocessing.image_size)
        assert torch.equal(normalize(crop[None], preprocessing)[0], preprocessing.image(image))


def test_every_kind_of_input_gives_the_same_batch_row(tmp_path) -> None:
    pixels = _rgb(50, 70)
    Image.fromarray(pixels).save(tmp_path / "part.png")
    grey = pixels[..., 0]
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 7, np.uint8)])
    inputs = [str(tmp_path / "part.png"), tmp_path / "part.png", Image.fromarray(pixels), pixels, pixels / 255.0,
              pixels.astype(np.float32) / 255, rgba, grey, grey[..., None], grey.astype(np.uint16) * 257]
    batch, sizes = prepare_images(inputs, _Model())
    assert batch.dtype == torch.float32 and batch.shape == (len(inputs), 3, 32, 32)
    assert sizes == [(50, 70)] * len(inputs)
    colour = PREPROCESSING.image(Image.fromarray(pixels))
    for row in batch[:7]:  # path, Path, PIL, uint8, float64, float32, RGBA (alpha dropped)
        assert torch.equal(row, colour)
    for row in batch[7:]:  # greyscale: HxW, HxWx1, uint16
        assert torch.equal(row, PREPROCESSING.image(Image.fromarray(grey)))
    crops, _ = prepare_images_uint8(inputs[:1], _Model())
    assert crops.dtype == torch.uint8 and torch.equal(normalize(crops, PREPROCESSING), batch[:1])


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros((8, 8, 2), np.uint8), r"input 1: an array of shape \(8, 8, 2\) is not an image.*HxWx3"),
    (np.zeros((3, 8, 8), np.uint8), r"input 1: an array of shape \(3, 8, 8\) is not an image.*channels last"),
    (np.full((8, 8), 2.0), r"input 1: a float array must hold values in \[0, 1\].*divide by 255"),
    (np.zeros((8, 8), np.int32), r"input 1: arrays of dtype int32 are not images"),
    ([1, 2, 3], r"input 1 is a list: pass a file path"),
])
def test_bad_inputs_are_refused_by_position(bad, message) -> None:
    with pytest.raises(ImageInputError, match=message):
        prepare_images([_rgb(8, 8), bad], _Model())


def test_unreadable_file_and_missing_preprocessing_are_named(tmp_path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.png"):
        prepare_images([tmp_path / "broken.png"], _Model())
    with pytest.raises(ValueError, match=r"no preprocessing record .*refit it"):
        prepare_images([_rgb(8, 8)], object())


# --------------------------------------------------------------------------- predict_images


@pytest.fixture(scope="module")
def model() -> PatchCore:
    """resnet18 (random weights) fitted on 2 crops of 32 px, preprocessing resize 40 / crop 32, with thresholds."""
    images = torch.stack([PREPROCESSING.image(Image.fromarray(_rgb(40, 40, seed))) for seed in (1, 2)])
    fitted = PatchCore(TorchvisionCNN("resnet18", ["layer2"], pretrained=False), PatchEmbedder(embed_dim=16),
                       progress=False)
    fitted.fit(DataLoader(TensorDataset(images), batch_size=2, collate_fn=lambda rows: torch.stack(
        [row[0] for row in rows])))
    fitted.preprocessing = PREPROCESSING
    return fitted


def test_predict_images_on_mixed_inputs(model, tmp_path) -> None:
    square, wide = _rgb(40, 40, seed=5), _rgb(60, 90, seed=6)
    Image.fromarray(square).save(tmp_path / "square.png")
    inputs = [tmp_path / "square.png", wide, Image.fromarray(_rgb(45, 41, seed=7)).convert("L")]
    # the independent path: the model's own preprocessing on PIL images, then model.score
    originals = [Image.fromarray(square), Image.fromarray(wide), inputs[2]]
    scores, crop_maps = model.score(torch.stack([PREPROCESSING.image(image) for image in originals]))
    pixel_threshold = float(crop_maps[0].median())
    model.threshold = {"image_threshold": float(scores.median()), "pixel_threshold": pixel_threshold,
                       "min_defect_area": 0}
    result = model.predict_images(inputs)  # one batch, as the independent path: the same float rounding

    assert np.array_equal(result.scores, scores.numpy().astype(np.float64))
    assert np.array_equal(result.crop_maps, crop_maps.numpy())
    assert [m.shape for m in result.maps] == [(40, 40), (60, 90), (45, 41)]
    assert [m.shape for m in result.masks] == [(40, 40), (60, 90), (45, 41)]
    assert result.decisions.tolist() == (scores >= scores.median()).tolist()
    # a 40 x 40 input is resized to itself: its map is the crop's, pasted at (4, 4), zero outside
    full = result.maps[0]
    assert np.array_equal(full[4:36, 4:36], crop_maps[0].numpy()) and full.sum() == pytest.approx(
        float(crop_maps[0].sum()), rel=1e-6)
    assert np.array_equal(result.masks[0][4:36, 4:36], crop_maps[0].numpy() >= pixel_threshold)
    assert not result.masks[0][:4].any() and not result.masks[0][:, 36:].any()
    # a 60 x 90 input: shorter side 40 -> 40 x 60, crop at (4, 14), then back to 60 x 90
    geometry = CropGeometry.of(60, 90, PREPROCESSING)
    assert (geometry.resized, geometry.top, geometry.left) == ((40, 60), 4, 14)
    model.threshold = None
    plain = model.predict_images(inputs, batch_size=1)  # other batches: the same to float rounding
    assert plain.decisions is None and plain.masks is None
    assert plain.scores == pytest.approx(result.scores, rel=1e-5)


def test_predict_images_is_the_same_after_save_and_load(model, tmp_path) -> None:
    model.threshold = {"image_threshold": 1.0, "pixel_threshold": 0.5, "min_defect_area": 4}
    loaded = PatchCore.load(model.save(tmp_path / "model"))
    images = [_rgb(70, 50, seed=9), Image.fromarray(_rgb(33, 33, seed=10))]
    before, after = model.predict_images(images), loaded.predict_images(images)
    assert np.array_equal(before.scores, after.scores) and before.decisions.tolist() == after.decisions.tolist()
    assert all(np.array_equal(a, b) for a, b in zip(before.maps, after.maps))
    assert all(np.array_equal(a, b) for a, b in zip(before.masks, after.masks))


def test_non_finite_scores_are_an_error(model, monkeypatch) -> None:
    monkeypatch.setattr(PatchCore, "score", lambda self, images: (torch.tensor([1.0, float("nan")]),
                                                                 torch.zeros(2, 32, 32)))
    with pytest.raises(ValueError, match=r"image scores of inputs \[1\] are NaN or infinite"):
        model.predict_images([_rgb(40, 40), _rgb(40, 40)])


# --------------------------------------------------------------------------- the documented example


def _documented_example() -> str:
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_example_runs_as_written(tmp_path, make_config, textures_root, monkeypatch, capsys) -> None:
    from experiments.harness.fit_and_evaluate import run

    readme = (REPO / "README.md").read_text()
    assert "docs/deployment.md" in readme
    # the documented fit (category=brick save_model=true threshold=nominal_sigma), smaller
    config = make_config("category=brick", "save_model=true", "threshold=nominal_sigma", "logger=none", "viz.n=0",
                         f"dataset.root={textures_root}", "dataset.train_limit=10", "coreset.ratio=0.05")
    run(config, tmp_path / "outputs" / "demo")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "textures").symlink_to(textures_root)
    monkeypatch.chdir(tmp_path)
    exec(compile(_documented_example(), "docs/deployment.md", "exec"), {})
    scores, decisions, shape, defect_pixels = capsys.readouterr().out.strip().splitlines()[-4:]
    assert len(scores.strip("[]").split()) == 3
    assert re.fullmatch(r"\[\s*(True|False)(\s+(True|False)){2}\s*\]", decisions)
    assert shape == "(240, 320)" and int(defect_pixels) >= 0
