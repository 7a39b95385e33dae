"""Anomaly-detection metrics following the conventions of the field.

Image level: AUROC and F1-max over image scores. Pixel level: AUROC and F1-max over
all pixels of all images, and AUPRO as defined by MVTec AD's reference evaluation code
(``compute_pro`` + ``trapezoid``). Every metric returns a plain Python float in [0, 1],
or ``None`` when it is undefined for the given data (never NaN), so results files and
W&B summaries never carry NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

# 8-connectivity, as in MVTec's reference code: diagonal neighbours belong to one region.
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)

# What each reported number is; written into every results.json and the report, so a reader comparing
# with a paper knows which PRO is meant.
METRIC_DEFINITIONS = {
    "image_auroc": "ROC AUC of the image scores against the image labels (sklearn roc_auc_score)",
    "image_f1_max": "best F1 over the precision-recall curve of the image scores (an oracle threshold on test labels)",
    "pixel_auroc": "ROC AUC over every pixel of every test image with a known mask, at crop resolution",
    "pixel_f1_max": "best F1 over the pixel precision-recall curve (an oracle threshold on test labels)",
    "aupro": "MVTec AD's reference AU-PRO: 8-connected ground-truth regions, false-positive rate over the "
             "anomaly-free pixels of ALL test images, integrated to FPR 0.3 and divided by 0.3",
    "aupro_defect_images": "the same AU-PRO over the anomalous test images only (their anomaly-free pixels give "
                           "the FPR), the convention of the official PatchCore README's PRO (94.4 on MVTec AD)",
}


# --------------------------------------------------------------------------- validation


def _checked(truth: np.ndarray, values: np.ndarray, ndim: int, names: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``truth`` as bool and ``values`` as float64 after checking rank, shape and finiteness."""
    truth = np.asarray(truth)
    values = np.asarray(values, dtype=np.float64)
    second = names.split(" and ")[1]
    if truth.ndim != ndim or values.ndim != ndim:
        layout = "1-D" if ndim == 1 else "3-D [N, H, W]"
        raise ValueError(f"{names} must be {layout}, got shapes {truth.shape} and {values.shape}")
    if truth.shape != values.shape:
        raise ValueError(f"{names} differ in {'length' if ndim == 1 else 'shape'}: {truth.shape} vs {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{second} contain NaN or infinite values")
    return truth.astype(bool), values


def _check_image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _checked(labels, scores, 1, "labels and scores")


def _check_pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _checked(masks, maps, 3, "masks and maps")


def _both_classes(labels: np.ndarray) -> bool:
    """AUROC needs at least one positive and one negative."""
    return bool(labels.any()) and not bool(labels.all())


# --------------------------------------------------------------------------- AUROC / F1


def f1_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F1, threshold) at every threshold of the precision-recall curve; ``score >= threshold`` is anomalous.

    sklearn's curve ends with a point (precision 1, recall 0, F1 0) that has no threshold; it is left out.
    """
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return f1, thresholds


def _best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over every threshold of the precision-recall curve (labels contain a positive)."""
    return float(f1_curve(labels, scores)[0].max())


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Image-level ROC AUC; None when only one class is present (AUROC undefined)."""
    labels, scores = _check_image_inputs(labels, scores)
    if not _both_classes(labels):
        return None
    return float(roc_auc_score(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Image-level F1-max; None without positives (recall undefined) and without negatives (every threshold
    then has precision 1, so the lowest score gives F1 = 1 whatever the scores: a number that measures nothing)."""
    labels, scores = _check_image_inputs(labels, scores)
    if not _both_classes(labels):
        return None
    return _best_f1(labels, scores)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """ROC AUC over all pixels of all images; None when pixels are all normal or all anomalous."""
    masks, maps = _check_pixel_inputs(masks, maps)
    flat_masks = masks.ravel()
    if not _both_classes(flat_masks):
        return None
    return float(roc_auc_score(flat_masks, maps.ravel()))


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """F1-max over all pixels of all images; None without anomalous pixels."""
    masks, maps = _check_pixel_inputs(masks, maps)
    flat_masks = masks.ravel()
    if not flat_masks.any():
        return None
    return _best_f1(flat_masks, maps.ravel())


# --------------------------------------------------------------------------- AUPRO


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected ground-truth regions per image, with ids unique over all images.

    Returns an int array shaped like ``masks`` (0 = normal, 1..R = region id) and R.
    Labelling per image keeps regions of different images apart even when stacked.
    """
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        region_ids[i] = np.where(labelled > 0, labelled + offset, 0)
        offset += count
    return region_ids, offset


@dataclass(frozen=True)
class _RankedPixels:
    """Every pixel of a set of maps, sorted once by score (descending), with what each metric counts.

    The pixel metrics all walk the same ranking; sorting a textures category's 7.5 M pixels takes about as long
    as the rest of its evaluation, so ``pixel_metrics`` sorts once where the one-metric functions sort each.
    Order within a run of tied scores is irrelevant (only a run's last index is kept): no stable sort.
    """

    scores: np.ndarray       # sorted, descending
    region_ids: np.ndarray   # 0 = normal pixel, 1..R = its 8-connected defect region
    image_index: np.ndarray  # which map each sorted pixel comes from
    pro_step: np.ndarray     # per region id: what one of its pixels adds to the PRO (1 / (|r| * R); 0 for normal)
    num_regions: int

    @classmethod
    def of(cls, masks: np.ndarray, maps: np.ndarray) -> _RankedPixels:
        region_ids, num_regions = _label_regions(masks)
        flat_scores = maps.ravel()
        order = np.argsort(flat_scores)[::-1]
        flat_ids = region_ids.ravel()
        region_sizes = np.bincount(flat_ids, minlength=num_regions + 1).astype(np.float64)
        pro_step = np.zeros(num_regions + 1, dtype=np.float64)
        pro_step[1:] = 1.0 / (region_sizes[1:] * num_regions)
        pixels_per_map = int(np.prod(masks.shape[1:]))
        return cls(flat_scores[order], flat_ids[order], order // pixels_per_map, pro_step, num_regions)

    def counts(self, keep_maps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(false positives, true positives, PRO) at every distinct threshold, highest first, over the maps
        flagged in ``keep_maps`` (all by default). Integer counts keep the rates exact (FPR exactly 0.3)."""
        scores, ids = self.scores, self.region_ids
        if keep_maps is not None:
            kept = keep_maps[self.image_index]
            scores, ids = scores[kept], ids[kept]
        normal = ids == 0
        last_of_run = np.append(np.diff(scores) != 0, True)
        false_positives = np.cumsum(normal, dtype=np.int64)[last_of_run]
        true_positives = np.cumsum(~normal, dtype=np.int64)[last_of_run]
        pro = np.cumsum(self.pro_step[ids])[last_of_run]
        return false_positives, true_positives, pro

    def pro_curve(self, counts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """(FPR, PRO) from (0, 0) to (1, 1) as in MVTec's compute_pro, from ``counts``; None without normal
        pixels or regions."""
        false_positives, _, pro = counts
        num_normal = int(false_positives[-1]) if len(false_positives) else 0
        if self.num_regions == 0 or num_normal == 0:
            return None
        fprs = np.concatenate(([0.0], false_positives / num_normal))
        pros = np.concatenate(([0.0], pro))
        return np.clip(fprs, 0.0, 1.0), np.clip(pros, 0.0, 1.0)


def _pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) at every distinct threshold, from (0, 0) to (1, 1), as in MVTec's compute_pro.

    Pixels are sorted by score once (descending); each normal pixel adds 1/num_normal to the
    FPR and each pixel of region r adds 1/(|r| * num_regions) to the PRO. Only the last index
    of a run of equal scores is kept, so tied pixels switch together at one threshold.
    Returns None when there is no normal pixel or no region.
    """
    ranked = _RankedPixels.of(masks, maps)
    return ranked.pro_curve(ranked.counts())


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], interpolating y linearly at x_max.

    Mirrors MVTec's ``trapezoid``: x is non-decreasing and ends at 1 >= x_max, so the
    segment straddling x_max exists whenever x_max is not itself a curve point.
    """
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    cut = int(np.searchsorted(x, x_max, side="right"))  # first point beyond x_max
    if cut < len(x) and x[cut - 1] < x_max:
        x0, x1, y0, y1 = x[cut - 1], x[cut], y[cut - 1], y[cut]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at_max) * (x_max - x0)
    return area


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    PRO weighs every connected defect region equally, so small defects count as much as
    large ones (MVTec AD, Bergmann et al.). None when there is no defect region or no
    normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    masks, maps = _check_pixel_inputs(masks, maps)
    return _aupro_of(_pro_curve(masks, maps), fpr_limit)


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _aupro_of(curve: tuple[np.ndarray, np.ndarray] | None, fpr_limit: float) -> float | None:
    """The normalised area under a PRO curve up to ``fpr_limit`` (None for no curve)."""
    if curve is None:
        return None
    fprs, pros = curve
    value = _area_up_to(fprs, pros, fpr_limit) / fpr_limit
    return float(min(max(value, 0.0), 1.0))


def aupro_defect_images(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """AU-PRO over the images that contain a defect only (see ``METRIC_DEFINITIONS``)."""
    masks, maps = _check_pixel_inputs(masks, maps)
    defective = masks.reshape(len(masks), -1).any(axis=1)
    return aupro(masks[defective], maps[defective], fpr_limit) if defective.any() else None


# --------------------------------------------------------------------------- all pixel metrics, one sort


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Pixel AUROC, pixel F1-max, AU-PRO and AU-PRO over the defect images, from one ranking of the pixels.

    Each equals its one-metric function above (sklearn's ROC AUC and precision-recall curve, MVTec's AU-PRO;
    tests/test_metrics.py), which stay the references; runs are scored with this one because it sorts the
    pixels once instead of four times. Values are None where the one-metric function gives None.
    """
    _check_fpr_limit(fpr_limit)
    masks, maps = _check_pixel_inputs(masks, maps)
    result: dict[str, float | None] = dict.fromkeys(PIXEL_METRICS)
    if not masks.any():
        return result
    ranked = _RankedPixels.of(masks, maps)
    counts = ranked.counts()
    false_positives, true_positives, _ = counts
    positives, negatives = int(true_positives[-1]), int(false_positives[-1])
    if negatives:
        # the ROC curve sklearn's roc_auc_score integrates, with (0, 0) first and no point dropped
        fpr = np.concatenate(([0.0], false_positives / negatives))
        tpr = np.concatenate(([0.0], true_positives / positives))
        result["pixel_auroc"] = float(np.trapezoid(tpr, fpr))
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positives
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    result["pixel_f1_max"] = float(f1.max())
    result["aupro"] = _aupro_of(ranked.pro_curve(counts), fpr_limit)
    defective = masks.reshape(len(masks), -1).any(axis=1)
    result["aupro_defect_images"] = _aupro_of(ranked.pro_curve(ranked.counts(defective)), fpr_limit)
    return result


PIXEL_METRICS = ("pixel_auroc", "pixel_f1_max", "aupro", "aupro_defect_images")


# --------------------------------------------------------------------------- all at once


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
) -> dict[str, float | None]:
    """All image and pixel metrics of one category; pixel metrics are None without masks/maps."""
    result: dict[str, float | None] = {
        "image_auroc": image_auroc(labels, scores),
        "image_f1_max": f1_max(labels, scores),
        **dict.fromkeys(PIXEL_METRICS),
    }
    if masks is None or maps is None:
        return result
    masks, maps = _check_pixel_inputs(masks, maps)
    if masks.shape[0] != len(labels):
        raise ValueError(f"{len(labels)} image labels but {masks.shape[0]} masks/maps")
    return {**result, **pixel_metrics(masks, maps)}
