"""Issue 26, prediction inputs and outputs: the same pixels give the same crop and score whatever kind of input
holds them (deliverable 5), a bad image list is refused before the model loads (9), and ``predict
overwrite=true`` replaces an earlier prediction only once the new one is complete (6)."""

from __future__ import annotations

import csv
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from core.api import ImageInputError, prepare_images_uint8
from core.backbones import TorchvisionCNN
from core.data import Preprocessing
from core.features import PatchEmbedder
from core.patchcore import PatchCore

REPO = Path(__file__).resolve().parents[1]
PREPROCESSING = Preprocessing(resize=40, image_size=32)
H, W = 37, 45


class _Model:  # anything with a ``preprocessing`` attribute
    preprocessing = PREPROCESSING


def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (Pillow writes none in colour): grey, grey+alpha, RGB or RGBA."""
    pixels = np.asarray(pixels, dtype=">u2")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


RNG = np.random.default_rng(26)
RGB8 = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY8 = RGB8[..., 0].copy()
ALPHA8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGB16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
GREY16 = RGB16[..., 0].copy()
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDICES = RNG.integers(0, 256, (H, W), dtype=np.uint8)
BITS = RNG.random((H, W)) > 0.5


def _palette_image() -> Image.Image:
    image = Image.fromarray(INDICES, mode="P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    return image


# Each kind: (a function of a tmp folder giving the input, the 8-bit pixels it must be read as). The
# expected pixels are computed here in numpy (high byte of 16-bit values, k / 255 floats, palette lookup),
# not by the code under test; the reference is those pixels saved as an 8-bit PNG and read back.
KINDS = {
    "png 8-bit grey": (lambda d: _save(Image.fromarray(GREY8), d / "g8.png"), GREY8),
    "png 8-bit RGB": (lambda d: _save(Image.fromarray(RGB8), d / "c8.png"), RGB8),
    "png 8-bit RGBA": (lambda d: _save(Image.fromarray(np.dstack([RGB8, ALPHA8])), d / "a8.png"), RGB8),
    "png 16-bit grey": (lambda d: _save(Image.fromarray(GREY16), d / "g16.png"), GREY16 >> 8),
    "png 16-bit grey+alpha": (lambda d: _png16(d / "ga16.png", np.dstack([GREY16, GREY16])), GREY16 >> 8),
    "png 16-bit RGB": (lambda d: _png16(d / "c16.png", RGB16), RGB16 >> 8),
    "png 16-bit RGBA": (lambda d: _png16(d / "a16.png", np.dstack([RGB16, GREY16])), RGB16 >> 8),
    "tiff float": (lambda d: _save(Image.fromarray(GREY8.astype(np.float32) / 255), d / "f.tif"), GREY8),
    "path as str": (lambda d: str(_save(Image.fromarray(RGB8), d / "s.png")), RGB8),
    "uint8 HxW": (lambda d: GREY8, GREY8),
    "uint8 HxWx1": (lambda d: GREY8[..., None], GREY8),
    "uint8 HxWx3": (lambda d: RGB8, RGB8),
    "uint8 HxWx4": (lambda d: np.dstack([RGB8, ALPHA8]), RGB8),
    "uint16 HxW": (lambda d: GREY16, GREY16 >> 8),
    "uint16 HxWx1": (lambda d: GREY16[..., None], GREY16 >> 8),
    "uint16 HxWx3": (lambda d: RGB16, RGB16 >> 8),
    "float32 HxW": (lambda d: GREY8.astype(np.float32) / 255, GREY8),
    "float32 HxWx1": (lambda d: GREY8[..., None].astype(np.float32) / 255, GREY8),
    "float32 HxWx3": (lambda d: RGB8.astype(np.float32) / 255, RGB8),
    "float64 HxW": (lambda d: GREY8 / 255.0, GREY8),
    "float64 HxWx3": (lambda d: RGB8 / 255.0, RGB8),
    "bool HxW": (lambda d: BITS, BITS.astype(np.uint8) * 255),
    "PIL L": (lambda d: Image.fromarray(GREY8), GREY8),
    "PIL RGB": (lambda d: Image.fromarray(RGB8), RGB8),
    "PIL RGBA": (lambda d: Image.fromarray(np.dstack([RGB8, ALPHA8])), RGB8),
    "PIL LA": (lambda d: Image.merge("LA", [Image.fromarray(GREY8), Image.fromarray(ALPHA8)]), GREY8),
    "PIL I;16": (lambda d: Image.fromarray(GREY16), GREY16 >> 8),
    "PIL I": (lambda d: Image.fromarray(GREY16.astype(np.int32)), GREY16 >> 8),
    "PIL F": (lambda d: Image.fromarray(GREY8.astype(np.float32) / 255), GREY8),
    "PIL P": (lambda d: _palette_image(), PALETTE[INDICES]),
    "PIL 1": (lambda d: Image.fromarray(BITS), BITS.astype(np.uint8) * 255),
}


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_input_kind_gives_the_crop_of_the_same_pixels_saved_as_a_file(kind, tmp_path) -> None:
    make, expected = KINDS[kind]
    reference = _save(Image.fromarray(np.asarray(expected, dtype=np.uint8)), tmp_path / "reference.png")
    crops, sizes = prepare_images_uint8([make(tmp_path), reference], _Model())
    assert sizes == [(H, W), (H, W)]
    assert torch.equal(crops[0], crops[1]), f"{kind}: {int((crops[0] != crops[1]).sum())} crop values differ"


@pytest.mark.parametrize(("bad", "message"), [
    (np.full((8, 8), -0.5), r"input 1: a float array must hold values in \[0, 1\] \(got \[-0\.5, -0\.5\]\)"),
    (np.where(np.eye(8) > 0, np.nan, 0.5), r"input 1: a float array has 8 NaN or infinite pixels"),
    (np.full((8, 8, 3), np.inf, np.float32), r"input 1: a float array has 192 NaN or infinite pixels"),
    (np.full((8, 8), 200.0), r"input 1: a float array must hold values in \[0, 1\] .*divide by 255"),
    (Image.fromarray(np.full((8, 8), np.nan, np.float32)), r"input 1 \(a float image, PIL mode F\) has 64 NaN"),
    (Image.fromarray(np.full((8, 8), 255.0, np.float32)), r"input 1 \(a float image, PIL mode F\) must hold "
                                                          r"values in \[0, 1\] \(got \[255, 255\]\)"),
    (Image.fromarray(np.full((8, 8), -3, np.int32)), r"input 1 \(PIL mode I\) must hold values in \[0, 65535\]"),
])
def test_out_of_range_pixels_are_refused_naming_the_input(bad, message) -> None:
    with pytest.raises(ImageInputError, match=message):
        prepare_images_uint8([RGB8, bad], _Model())


def test_a_float_tiff_out_of_range_is_named_by_its_path(tmp_path) -> None:
    from core.data import DatasetError

    Image.fromarray(np.full((8, 8), 2.0, np.float32)).save(tmp_path / "hot.tif")
    with pytest.raises(DatasetError, match=r"input 0 \(.*hot\.tif\) \(a float image, PIL mode F\) must hold values"):
        prepare_images_uint8([tmp_path / "hot.tif"], _Model())


# --------------------------------------------------------------------------- end to end, a tiny model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """resnet18 (random weights, seeded) fitted on 2 crops of 32 px, saved with a threshold record."""
    torch.manual_seed(0)
    images = torch.stack([PREPROCESSING.image(Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))) for seed in (1, 2)])
    model = PatchCore(TorchvisionCNN("resnet18", ["layer2"], pretrained=False), PatchEmbedder(embed_dim=16),
                      progress=False)
    model.fit(DataLoader(TensorDataset(images), batch_size=2, collate_fn=lambda rows: torch.stack(
        [row[0] for row in rows])))
    model.preprocessing = PREPROCESSING
    scores, maps = model.score(images)
    threshold = {"image_threshold": float(scores.max()) + 1.0, "pixel_threshold": float(maps.median()),
                 "min_defect_area": 0}
    return model.save(tmp_path_factory.mktemp("model") / "model", threshold=threshold)


def test_a_mode_f_image_scores_like_the_same_pixels_from_a_file(saved_model, tmp_path) -> None:
    model = PatchCore.load(saved_model)
    Image.fromarray(RGB8).convert("L").save(tmp_path / "grey.png")
    grey = np.asarray(Image.open(tmp_path / "grey.png"))
    result = model.predict_images([tmp_path / "grey.png", Image.fromarray(grey.astype(np.float32) / 255),
                                   grey / 255.0, grey])
    assert result.scores[0] == result.scores[1] == result.scores[2] == result.scores[3]
    assert result.decisions.tolist() == [result.decisions[0]] * 4
    clipped = model.predict_images([Image.fromarray(grey.astype(np.float32) / 255).convert("L")])  # PIL's clip
    assert clipped.scores[0] != result.scores[0]  # what a mode-F image was read as before: a black image


# --------------------------------------------------------------------------- the image list, before the model


@pytest.mark.parametrize(("images", "message"), [
    ([], r"images=\[\] names no image"),
    ("{d}/nothing/*.png", r"found no image files"),
    ("{d}/docs", r"found no image files"),
    ("{d}/gone.png", r"found no image files"),
    (["{d}/texts/notes.png", "{d}/gone.png"], r"none of the 1 images could be scored"),
])
def test_a_bad_image_list_is_refused_before_the_model_loads(images, message, saved_model, tmp_path,
                                                            monkeypatch) -> None:
    from experiments.harness import prediction

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("a folder with no image files")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.png").write_text("not an image, named like one")
    loaded = []
    monkeypatch.setattr(prediction, "load_model", lambda *args: loaded.append(args))
    spec = [item.format(d=tmp_path) for item in images] if isinstance(images, list) else images.format(d=tmp_path)
    with pytest.raises(prediction.NothingScoredError, match=message):
        prediction.predict(saved_model, spec, tmp_path / "preds", progress=False)
    assert loaded == []  # refused before any model was loaded


def test_the_command_line_names_a_bad_glob_in_seconds(saved_model, tmp_path) -> None:
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "predict.py"), f"model_dir={saved_model}",
                           f"images={tmp_path}/typo/*.png", f"out={tmp_path / 'preds'}", "device=cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"error: images={tmp_path}/typo/*.png found no image files" in done.stderr
    assert "the pattern matches no file" in (tmp_path / "preds" / "skipped.csv").read_text()
    assert time.monotonic() - start < 60  # no model was loaded


# --------------------------------------------------------------------------- overwrite: whole or not at all


def _images(folder: Path, count: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(folder / f"part{index}.png")
    return [str(folder)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() if path.is_file() else b"<folder>" for path in sorted(folder.iterdir())}


def test_a_failed_overwrite_keeps_every_earlier_file_and_a_complete_one_leaves_none(saved_model, tmp_path,
                                                                                    monkeypatch) -> None:
    from experiments.harness import prediction

    out = tmp_path / "preds"
    earlier_rows = prediction.predict(saved_model, _images(tmp_path / "old", 7, seed=1), out, progress=False)
    (out / "predict.log").write_text("hydra's log of this run\n")  # Hydra opens it before predict runs
    before = _snapshot(out)
    assert len(before) == 2 + 2 * 7 + 1 and len(earlier_rows) == 7  # 2 CSVs, a heatmap and a mask each, the log

    real_write, calls = prediction.write_outputs, []

    def failing_write(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prediction, "write_outputs", failing_write)
    new_images = _images(tmp_path / "new", 4, seed=2)
    with pytest.raises(OSError, match="No space left"):
        prediction.predict(saved_model, new_images, out, progress=False, overwrite=True)
    assert _snapshot(out) == before  # every earlier file still there, byte-identical
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".preds.")] == []  # no temporary left

    monkeypatch.setattr(prediction, "write_outputs", real_write)
    rows = prediction.predict(saved_model, new_images, out, progress=False, overwrite=True)
    after = _snapshot(out)
    expected = {"predictions.csv", "skipped.csv", "predict.log"} | {f"part{i}_{kind}.png" for i in range(4)
                                                                    for kind in ("heatmap", "mask")}
    assert set(after) == expected  # part4..part6 of the earlier run are gone, not mixed with the new ones
    assert after["predict.log"] == before["predict.log"]  # Hydra's log moved over
    with (out / "predictions.csv").open() as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == [row["path"] for row in rows]
    assert all("/new/" in row["path"] for row in rows)


def test_nothing_scored_keeps_an_earlier_prediction(saved_model, tmp_path) -> None:
    from experiments.harness import prediction

    out = tmp_path / "preds"
    prediction.predict(saved_model, _images(tmp_path / "old", 2, seed=1), out, progress=False)
    before = _snapshot(out)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(prediction.NothingScoredError, match=r"none of the 1 images could be scored \(.*broken\.png: "
                                                            r"cannot read image.*the earlier prediction in .* is kept"):
        prediction.predict(saved_model, [str(tmp_path / "broken.png")], out, progress=False, overwrite=True)
    assert _snapshot(out) == before


@pytest.mark.parametrize("foreign", ["notes.txt", "000_mask.png", "sub"])
def test_a_folder_holding_anything_else_is_refused_untouched(foreign, saved_model, tmp_path, monkeypatch) -> None:
    from experiments.harness import prediction

    out = tmp_path / "preds"
    prediction.predict(saved_model, _images(tmp_path / "old", 1, seed=1), out, progress=False)
    if foreign == "sub":
        (out / foreign).mkdir()
    else:
        (out / foreign).write_bytes(b"the user's own file")  # e.g. an MVTec ground-truth mask
    before = _snapshot(out)
    monkeypatch.setattr(prediction, "load_model", lambda *args: pytest.fail("the model was loaded"))
    for overwrite in (False, True):
        with pytest.raises(prediction.OutputFolderError, match=rf"out=.*preds holds 1 entries that are not an "
                                                               rf"earlier prediction's files \(e\.g\. {foreign}\)"):
            prediction.predict(saved_model, _images(tmp_path / "new", 1, seed=2), out, progress=False,
                               overwrite=overwrite)
        assert _snapshot(out) == before


def test_a_swap_killed_midway_is_put_back_by_the_next_run(tmp_path) -> None:
    from core.io import remove_dead_folder_temporaries, replace_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    old = tmp_path / f".preds.{pid}.abc.old"  # killed between moving the earlier folder aside and the new in
    old.mkdir()
    (old / "predictions.csv").write_text("earlier\n")
    half = tmp_path / f".preds.{pid}.abc.tmp"
    half.mkdir()
    (half / "part_heatmap.png").write_bytes(b"half")
    assert sorted(p.name for p in remove_dead_folder_temporaries(tmp_path / "preds")) == [old.name, half.name]
    assert (tmp_path / "preds" / "predictions.csv").read_text() == "earlier\n" and not half.exists()
    live = tmp_path / f".preds.{os.getpid()}.xyz.tmp"  # a running writer's: not ours to remove
    live.mkdir()
    replace_folder(tmp_path / "preds", lambda folder: (folder / "predictions.csv").write_text("new\n"))
    assert (tmp_path / "preds" / "predictions.csv").read_text() == "new\n" and live.is_dir()


def test_out_is_made_with_its_parents_and_never_the_working_folder(saved_model, tmp_path, monkeypatch) -> None:
    from experiments.harness import prediction

    rows = prediction.predict(saved_model, _images(tmp_path / "old", 1, seed=1), tmp_path / "a" / "b" / "preds",
                              progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "b" / "preds").iterdir()) == [
        "part0_heatmap.png", "part0_mask.png", "predictions.csv", "skipped.csv"] and len(rows) == 1
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for out in (".", str(tmp_path)):
        with pytest.raises(prediction.OutputFolderError, match=r"is the working folder or holds it"):
            prediction.predict(saved_model, _images(tmp_path / "new", 1, seed=2), out, progress=False)
