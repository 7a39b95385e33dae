"""Scoring new images with a saved model (``experiments/predict.py``): decisions, heatmaps and defect masks
at the images' own size.

``images`` takes files, folders (every image inside, sorted), globs, or a list of them; any size,
grayscale or RGB. Unreadable files are reported (log and ``skipped.csv``) and skipped. Writes
``predictions.csv`` (path, score, decision, files) and per image ``<name>_heatmap.png`` (overlay)
and ``<name>_mask.png`` (binary, needs a model saved with a threshold). The model sees the same
resize + centre crop as at fit time; pixels outside the crop are not scored.
"""

from __future__ import annotations

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
from core.detector import load_detector
from core.io import atomic_write, write_csv_atomic
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
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                reason = "no such file" if not glob.has_magic(str(path)) else "the pattern matches no file"
                log.warning("images=%s: %s", entry, reason)
                if missing is not None:
                    missing.append({"path": str(entry), "reason": reason})
            found += matches
    return list(dict.fromkeys(found))


OUTPUT_FILES = ("predictions.csv", "skipped.csv")


class OutputFolderError(ValueError):
    """``out`` holds an earlier prediction's files, or cannot be written."""


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds an earlier prediction's files (they would be silently replaced or mixed
    with this run's) unless ``overwrite``; Hydra's own log file does not count."""
    earlier = [p.name for p in out.iterdir() if p.name in OUTPUT_FILES or p.name.endswith(("_heatmap.png",
                                                                                          "_mask.png"))] \
        if out.is_dir() else []
    if earlier and not overwrite:
        raise OutputFolderError(f"out={out} already holds the results of an earlier prediction ({len(earlier)} files, "
                              f"e.g. {sorted(earlier)[0]}): pass a new out=<folder>, or overwrite=true to replace them")
    if earlier:
        for name in earlier:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise OutputFolderError(f"out={out} is not writable: choose another out=<folder>")


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
    rgb = np.asarray(original.convert("RGB"), dtype=np.float32)
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
            batch.append((path, original, preprocessing.image(original)))
        except DatasetError as error:
            log.warning("skipped %s: %s", path, error)
            skipped.append({"path": str(path), "reason": str(error)})
    return batch


def predict(model_dir: str | Path, images: str | list[str], out: str | Path, device: str = "auto",
            batch_size: int = 8, progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Score every readable image; returns the rows written to ``predictions.csv``. Raises
    ``NothingScoredError`` (after writing skipped.csv) when no image could be scored."""
    out = Path(out)
    prepare_out(out, overwrite)  # before the model loads: a taken folder fails in a second
    model = load_model(model_dir, resolve_device(device))
    preprocessing, threshold = _saved_settings(model, model_dir)
    skipped: list[dict] = []
    paths = expand_images(images, skipped)
    if not paths:
        write_csv_atomic(out / "skipped.csv", ["path", "reason"], skipped)
        raise NothingScoredError(f"images={images} found no image files ({', '.join(IMAGE_EXTENSIONS)})")
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
            heat_file, mask_file = write_outputs(out, _unique_name(path, taken), original, crop_map, geometry,
                                                 threshold)
            decision = "" if image_threshold is None else ("anomalous" if score >= image_threshold else "nominal")
            rows.append({"path": str(path), "score": score, "decision": decision, "heatmap": heat_file,
                         "mask": mask_file})
    write_csv_atomic(out / "predictions.csv", ["path", "score", "decision", "heatmap", "mask"], rows)
    write_csv_atomic(out / "skipped.csv", ["path", "reason"], skipped)
    log.info("%d images scored, %d skipped; results in %s", len(rows), len(skipped), out)
    if not rows:
        raise NothingScoredError(f"none of the {len(paths)} images could be scored: see {out / 'skipped.csv'}")
    return rows


class NothingScoredError(ValueError):
    """No input image could be scored (predict.py exits non-zero); skipped.csv says why for each."""
