"""A few anomaly maps per category, saved with the run for W&B and the report's image grid (``viz.n``).

Format (one pair of files per selected test image, in ``<run_dir>/maps/<category>/``)::

    <k>_<defect_type>_<stem>.npz   image   uint8 [H, W, 3]  the preprocessed (resized, cropped) test image
                                   map     float16 [H, W]   the anomaly map (raw patch-distance units)
                                   mask    uint8 [H, W]     ground truth, 1 = defect (all 0 if unknown)
                                   has_mask, label (1 = anomalous), score (image score),
                                   path, defect_type, vmin, vmax (map range over the whole test set),
                                   image_threshold, pixel_threshold (NaN without a threshold rule),
                                   min_defect_area (pixels; smaller predicted regions are dropped)
    <k>_<defect_type>_<stem>.png   image | ground truth | map (inferno, scaled to [vmin, vmax]) | with a
                                   threshold rule, the thresholded segmentation (cyan), side by side

The images are chosen from the test set alone (sorted by path: about three quarters anomalous, spread
over the defect types, the rest nominal), so every backbone's run of one dataset saves the same images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from core.io import atomic_write
from core.thresholds import segment

MAPS_DIR = "maps"


def pick_indices(labels, defect_types: list[str], paths: list[str], n: int) -> list[int]:
    """``n`` test images: ceil(3n/4) anomalous ones round-robin over defect types, then nominal ones."""
    if n <= 0:
        return []
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    by_type: dict[str, list[int]] = {}
    for i in order:
        if int(labels[i]) == 1:
            by_type.setdefault(defect_types[i], []).append(i)
    nominal = [i for i in order if int(labels[i]) == 0]
    chosen: list[int] = []
    queues = [by_type[t] for t in sorted(by_type)]
    want_bad = min(math.ceil(3 * n / 4) if nominal else n, sum(len(q) for q in queues))
    depth = 0
    while len(chosen) < want_bad:
        for queue in queues:
            if depth < len(queue) and len(chosen) < want_bad:
                chosen.append(queue[depth])
        depth += 1
    chosen += nominal[: n - len(chosen)]
    return chosen


def denormalise(image, mean, std) -> np.ndarray:
    """``[3, H, W]`` normalised tensor/array -> ``uint8 [H, W, 3]``."""
    array = np.asarray(image, dtype=np.float32).transpose(1, 2, 0)
    array = array * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def save_maps(out_dir: Path, predictions, dataset, preprocessing, n: int, threshold: dict | None = None) -> list[Path]:
    """Write the npz + png of ``n`` chosen test images; returns the PNG paths.

    ``threshold`` (the run's threshold record, with ``image_threshold`` / ``pixel_threshold``) is stored
    with each image, and the pixel threshold's region is outlined in the PNG's map panel.
    """
    threshold = threshold or {}
    indices = pick_indices(predictions.labels, predictions.defect_types, predictions.paths, n)
    if not indices:
        return []
    vmin, vmax = float(predictions.maps.min()), float(predictions.maps.max())
    written = []
    for k, i in enumerate(indices):
        image = denormalise(dataset[i]["image"], preprocessing.mean, preprocessing.std)
        record = {
            "image": image,
            "map": predictions.maps[i].astype(np.float16),
            "mask": predictions.masks[i].astype(np.uint8),
            "has_mask": bool(predictions.has_mask[i]),
            "label": int(predictions.labels[i]),
            "score": float(predictions.image_scores[i]),
            "path": str(predictions.paths[i]),
            "defect_type": str(predictions.defect_types[i]),
            "vmin": vmin,
            "vmax": vmax,
            "image_threshold": _number(threshold.get("image_threshold")),
            "pixel_threshold": _number(threshold.get("pixel_threshold")),
            "min_defect_area": int(threshold.get("min_defect_area") or 0),
        }
        written.append(save_record(out_dir / f"{k:02d}_{record['defect_type']}_{Path(record['path']).stem}", record))
    return written


def save_record(stem: Path, record: dict) -> Path:
    """``<stem>.npz`` (the record, format above) and ``<stem>.png`` (its panel); returns the PNG path."""
    atomic_write(stem.with_name(stem.name + ".npz"), lambda tmp: _savez(tmp, record))
    panel = render_panel(record)
    return atomic_write(stem.with_name(stem.name + ".png"), lambda tmp: panel.save(tmp, format="PNG"))


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _savez(path: Path, record: dict) -> None:
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **record)


def load_maps(folder: Path) -> list[dict]:
    """The saved records of one category folder, in file order."""
    records = []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            record = {key: data[key] for key in data.files}
        for key in ("has_mask", "label", "score", "path", "defect_type", "vmin", "vmax", "image_threshold",
                    "pixel_threshold", "min_defect_area"):
            if key in record:
                record[key] = record[key].item()
        record["map"] = record["map"].astype(np.float32)
        record["file"] = path
        records.append(record)
    return records


def colorize(anomaly_map: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """``[H, W]`` map -> ``uint8 [H, W, 3]`` through a matplotlib colormap, scaled to [vmin, vmax]."""
    from matplotlib import colormaps

    scaled = (np.asarray(anomaly_map, np.float32) - vmin) / max(vmax - vmin, 1e-12)
    return (colormaps[cmap](np.clip(scaled, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def render_panel(record: dict):
    """PIL image: test image | ground truth (red) | anomaly map [| thresholded segmentation (cyan)].

    The segmentation panel appears when the run had a threshold rule: pixels above the pixel
    threshold, regions smaller than ``min_defect_area`` dropped, exactly as decisions are made.
    """
    from PIL import Image

    image = record["image"]
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    panels = [image, gap, _tint(image, record["mask"].astype(bool), (255, 0, 0)), gap,
              colorize(record["map"], record["vmin"], record["vmax"])]
    pixel_threshold = float(record.get("pixel_threshold", float("nan")))
    if not math.isnan(pixel_threshold):
        region = segment(np.asarray(record["map"], np.float32), pixel_threshold,
                         int(record.get("min_defect_area", 0)))
        panels += [gap, _tint(image, region, (0, 255, 255))]
    return Image.fromarray(np.concatenate(panels, axis=1))


def _tint(image: np.ndarray, where: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    tinted = image.copy()
    tinted[where] = (0.5 * tinted[where] + 0.5 * np.array(colour)).astype(np.uint8)
    return tinted
