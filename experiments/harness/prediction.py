"""Scoring new images with a saved model (``experiments/predict.py``): decisions, heatmaps and defect masks
at the images' own size.

``images`` takes files, folders (every image inside, sorted), globs, or a list of them; any size,
grayscale or RGB. Unreadable files are reported (log and ``skipped.csv``) and skipped. Writes
``predictions.csv`` (path, score, decision, files) and per image ``<name>_heatmap.png`` (overlay)
and ``<name>_mask.png`` (binary, needs a model saved with a threshold). The model sees the same
resize + centre crop as at fit time; pixels outside the crop are not scored.

Checked before the model loads: ``out`` (new, empty, or only an earlier prediction's files, replaced with
``overwrite=true``) and the image list (resolved, each file's header read). The outputs are written into a
temporary sibling of ``out`` and swapped in whole (``core.io.replace_folder``): a run that fails midway
leaves an earlier prediction as it was.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from core.api import CropGeometry, resize_map
from core.cae import CAE
from core.data import IMAGE_EXTENSIONS, DatasetError, Preprocessing, read_image
from core.data.images import header_problem
from core.data.pixels import to_rgb8
from core.detector import load_detector
from core.io import atomic_write, replace_folder, write_csv_atomic
from core.patchcore import ModelMismatchError, PatchCore
from core.thresholds import segment
from experiments.harness.anomaly_maps import colorize
from experiments.harness.components import resolve_device
from experiments.harness.evaluation import require_finite

log = logging.getLogger("predict")


def expand_images(spec: str | list[str], missing: list[dict] | None = None) -> list[Path]:
    """Files, folders and globs -> a sorted, de-duplicated list of image files; ``missing`` collects the
    entries that name nothing (skipped.csv rows)."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    found: list[Path] = []
    for entry in entries:
        path = Path(str(entry)).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            reason = f"the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        elif path.is_file():
            matches, reason = [path], ""
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            reason = "no such file" if not glob.has_magic(str(path)) else "the pattern matches no file"
        if not matches:
            log.warning("images=%s: %s", entry, reason)
            if missing is not None:
                missing.append({"path": str(entry), "reason": reason})
        found += matches
    return list(dict.fromkeys(found))


def resolve_images(spec: str | list[str], skipped: list[dict]) -> tuple[list[Path], int]:
    """The image files ``spec`` names whose headers read as images, before any model is loaded (a typo'd
    glob or a folder of text files is reported in a second, not after the model's load); the entries that
    name nothing and the unreadable files go to ``skipped``. ``(readable files, files found)``;
    ``NothingScoredError`` when ``spec`` is empty."""
    if not spec or (isinstance(spec, str) and not spec.strip()):
        raise NothingScoredError(f"images={spec!r} names no image: pass a file, a folder, a glob "
                                 f"('/line/cam3/*.png') or a list of them")
    usable, found = [], expand_images(spec, skipped)
    for path in found:
        problem = header_problem(path)
        if problem is None:
            usable.append(path)
        else:
            log.warning("skipped %s: %s", path, problem)
            skipped.append({"path": str(path), "reason": problem})
    return usable, len(found)


PREDICTIONS, SKIPPED = "predictions.csv", "skipped.csv"
_COLUMNS = ["path", "score", "decision", "heatmap", "mask"]


class OutputFolderError(ValueError):
    """``out`` holds an earlier prediction's files, something else, or cannot be written."""


def _kept(name: str) -> bool:
    """Entries of ``out`` that are not predictions but may be there: Hydra's log (``predict.log``, opened
    before the task runs) and its ``.hydra`` record. They move over to the new outputs."""
    return name.endswith(".log") or name == ".hydra"


def earlier_outputs(out: Path) -> set[str]:
    """The names of an earlier prediction's files in ``out``: its two CSV files and the heatmaps and masks
    its ``predictions.csv`` lists."""
    names = {name for name in (PREDICTIONS, SKIPPED) if (out / name).is_file()}
    if PREDICTIONS in names:
        try:
            with (out / PREDICTIONS).open(newline="") as handle:
                for row in csv.DictReader(handle):
                    names |= {row.get(key) or "" for key in ("heatmap", "mask")} - {""}
        except (OSError, UnicodeDecodeError, csv.Error):
            pass  # not a predictions.csv this code wrote: only the CSV itself counts
    return names


def check_out(out: Path, overwrite: bool) -> set[str]:
    """Refuse, before the model loads and without touching it, an ``out`` that is a file, holds anything but
    an earlier prediction's files (and Hydra's log), holds an earlier prediction without ``overwrite``, or
    cannot be written; returns the earlier prediction's file names (replaced only once the new ones are
    complete: ``predict``)."""
    folder = Path(os.path.abspath(out))
    if Path.cwd() == folder or folder in Path.cwd().parents:
        raise OutputFolderError(f"out={out} is the working folder or holds it: the outputs replace the folder "
                                f"whole; pass a new out=<folder>")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"out={out} is a file, not a folder: pass a new out=<folder>")
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    earlier = earlier_outputs(out) & present
    foreign = sorted(name for name in present - earlier if not _kept(name))
    if foreign:
        raise OutputFolderError(f"out={out} holds {len(foreign)} entries that are not an earlier prediction's files "
                                f"(e.g. {foreign[0]}): predictions go to a new or empty folder (or one holding only "
                                f"an earlier prediction, with overwrite=true); pass a new out=<folder>")
    if earlier and not overwrite:
        raise OutputFolderError(f"out={out} already holds the results of an earlier prediction ({len(earlier)} "
                                f"files, e.g. {sorted(earlier)[0]}): pass a new out=<folder>, or overwrite=true to "
                                f"replace them")
    parent = next(p for p in folder.parents if p.exists())  # the nearest folder that exists: made if need be
    if (out.is_dir() and not os.access(out, os.W_OK)) or not os.access(parent, os.W_OK):
        raise OutputFolderError(f"out={out} is not writable (the new outputs are written next to it, in "
                                f"{folder.parent}, then moved into place): choose another out=<folder>")
    return earlier


def load_model(model_dir: str | Path, device: torch.device) -> PatchCore | CAE:
    """The saved model in ``model_dir``, of the kind its ``model.json`` names (PatchCore unless it says cae)."""
    model_dir = Path(model_dir)
    if not os.path.lexists(model_dir / "model.json"):
        raise FileNotFoundError(f"model_dir={model_dir} holds no model.json: pass a models/<category>/ folder "
                                f"written by `python experiments/main.py ... save_model=true`")
    return load_detector(model_dir, device=str(device), progress=False)  # either kind through the same gate


def write_outputs(out: Path, name: str, original: Image.Image, crop_map: np.ndarray, geometry: CropGeometry,
                  threshold: dict) -> tuple[str, str]:
    """Heatmap overlay and (with a pixel threshold) binary mask, both at the original resolution."""
    height, width = original.height, original.width
    canvas = geometry.uncrop(crop_map)
    full_map = resize_map(canvas, (height, width), "bilinear")
    pixel_threshold = threshold.get("pixel_threshold")
    vmax = 2.0 * pixel_threshold if pixel_threshold else max(float(full_map.max()), 1e-12)
    heat = colorize(full_map, 0.0, vmax, "jet")
    rgb = np.asarray(to_rgb8(original), dtype=np.float32)
    overlay = Image.fromarray((0.5 * rgb + 0.5 * heat).astype(np.uint8))
    heat_file = f"{name}_heatmap.png"
    atomic_write(out / heat_file, lambda tmp: overlay.save(tmp, format="PNG"))
    if pixel_threshold is None:
        return heat_file, ""
    defect = segment(canvas, pixel_threshold, int(threshold.get("min_defect_area") or 0))
    full_mask = resize_map(defect.astype(np.float32), (height, width), "nearest") > 0.5
    mask_image = Image.fromarray(full_mask.astype(np.uint8) * 255)
    mask_file = f"{name}_mask.png"
    atomic_write(out / mask_file, lambda tmp: mask_image.save(tmp, format="PNG"))
    return heat_file, mask_file


def _unique_name(path: Path, taken: set[str]) -> str:
    name, counter = path.stem, 1
    while name in taken:
        counter += 1
        name = f"{path.stem}_{counter}"
    taken.add(name)
    return name


def _saved_settings(model, model_dir: str | Path) -> tuple[Preprocessing, dict]:
    """The preprocessing and threshold record the model was saved with (a PatchCore model holds them; the
    CAE's are in its metadata)."""
    metadata = getattr(model, "metadata", {})
    preprocessing = getattr(model, "preprocessing", None) or metadata.get("preprocessing")
    if preprocessing is None:
        raise ModelMismatchError(f"{model_dir}/model.json has no preprocessing record: refit with this version")
    threshold = getattr(model, "threshold", None) or metadata.get("threshold") or {}
    if not threshold:
        log.warning("the model was saved without a threshold: scores and heatmaps only, no decisions or masks "
                    "(fit with threshold=nominal_sigma or another rule to get them)")
    if not isinstance(preprocessing, Preprocessing):
        preprocessing = Preprocessing(**preprocessing)
    return preprocessing, threshold


def _read_batch(paths: list[Path], preprocessing: Preprocessing, skipped: list[dict]) -> list[tuple]:
    """(path, original image, model input) of each readable image; the others go to ``skipped``."""
    batch = []
    for path in paths:
        try:
            original = read_image(path)
            batch.append((path, original, preprocessing.image(original, f"image {path}")))
        except DatasetError as error:
            log.warning("skipped %s: %s", path, error)
            skipped.append({"path": str(path), "reason": str(error)})
    return batch


def predict(model_dir: str | Path, images: str | list[str], out: str | Path, device: str = "auto",
            batch_size: int = 8, progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Score every readable image; returns the rows written to ``predictions.csv``. The output folder and the
    image list are checked before the model loads; the outputs are written into a temporary sibling of
    ``out`` and swapped in only once complete, so an earlier prediction there (``overwrite=true``) is
    replaced whole or not at all. Raises ``NothingScoredError`` when no image could be scored (skipped.csv
    says why, unless an earlier prediction's files are kept in its place)."""
    out = Path(os.path.abspath(out))  # "preds/." or "a/../preds": the folder itself, which is replaced whole
    earlier = check_out(out, overwrite)  # before the model loads: a taken folder fails in a second
    skipped: list[dict] = []
    paths, found = resolve_images(images, skipped)
    if not paths:
        what = (f"none of the {found} images could be scored" if found else
                f"images={images} found no image files ({', '.join(IMAGE_EXTENSIONS)})")
        _write_nothing_scored(out, earlier, skipped, what)
    model = load_model(model_dir, resolve_device(device))
    preprocessing, threshold = _saved_settings(model, model_dir)
    rows: list[dict] = []

    def write(folder: Path) -> None:
        rows.extend(_score_into(folder, model, paths, preprocessing, threshold, batch_size, skipped, progress))
        if not rows and earlier:  # keep the earlier prediction rather than replace it by nothing
            raise NothingScoredError(f"none of the {len(paths)} images could be scored ({_reasons(skipped)}); the "
                                     f"earlier prediction in {out} is kept")
        write_csv_atomic(folder / PREDICTIONS, _COLUMNS, rows)
        write_csv_atomic(folder / SKIPPED, ["path", "reason"], skipped)

    replace_folder(out, write, keep=_kept)
    log.info("%d images scored, %d skipped; results in %s", len(rows), len(skipped), out)
    if not rows:
        raise NothingScoredError(f"none of the {len(paths)} images could be scored: see {out / SKIPPED}")
    return rows


def _score_into(folder: Path, model, paths: list[Path], preprocessing: Preprocessing, threshold: dict,
                batch_size: int, skipped: list[dict], progress: bool) -> list[dict]:
    """Score ``paths`` in batches, writing each image's heatmap and mask into ``folder``; the CSV rows."""
    image_threshold = threshold.get("image_threshold")
    rows, taken = [], set()
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not progress):
        batch = _read_batch(paths[start : start + batch_size], preprocessing, skipped)
        if not batch:
            continue
        scores, maps = model.score(torch.stack([tensor for _, _, tensor in batch]))
        require_finite(scores.numpy(), f"{', '.join(str(path) for path, _, _ in batch)}")
        for (path, original, _), score, crop_map in zip(batch, scores.tolist(), maps.numpy()):
            geometry = CropGeometry.of(original.height, original.width, preprocessing)
            heat_file, mask_file = write_outputs(folder, _unique_name(path, taken), original, crop_map, geometry,
                                                 threshold)
            decision = "" if image_threshold is None else ("anomalous" if score >= image_threshold else "nominal")
            rows.append({"path": str(path), "score": score, "decision": decision, "heatmap": heat_file,
                         "mask": mask_file})
    return rows


def _write_nothing_scored(out: Path, earlier: set[str], skipped: list[dict], what: str) -> None:
    """No input is usable (found before the model loads): say so; skipped.csv lists each entry and why,
    unless an earlier prediction's files are in ``out`` (they are kept, and the reasons are in the message)."""
    if earlier:
        raise NothingScoredError(f"{what} ({_reasons(skipped)}); the earlier prediction in {out} is kept")
    replace_folder(out, lambda folder: write_csv_atomic(folder / SKIPPED, ["path", "reason"], skipped), keep=_kept)
    raise NothingScoredError(f"{what}: see {out / SKIPPED}")


def _reasons(skipped: list[dict], most: int = 3) -> str:
    shown = "; ".join(f"{row['path']}: {row['reason']}" for row in skipped[:most])
    return shown + (f"; and {len(skipped) - most} more" if len(skipped) > most else "") if skipped else "no input"


class NothingScoredError(ValueError):
    """No input image could be scored (predict.py exits non-zero); skipped.csv says why for each."""
