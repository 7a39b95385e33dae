"""Decisions from scores: threshold rules, confusion matrices and thresholded segmentation.

AUROC says how well scores rank; a production line needs a yes/no per part and a region
per defect. Rules that look only at held-out *nominal* images (``nominal_sigma``,
``nominal_quantile``) can be used in deployment; ``f1_optimal`` looks at test labels and
is an optimistic upper bound, labelled as such wherever it is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from core.metrics import EIGHT_CONNECTED, f1_curve


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold (``score >= t`` is anomalous) with the best F1 on these labels."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.min() == labels.max():
        raise ValueError("f1_optimal needs both nominal and anomalous examples")
    f1, thresholds = f1_curve(labels, scores)
    return float(thresholds[int(np.argmax(f1))])


def nominal_sigma_threshold(nominal_scores: np.ndarray, k: float = 3.0) -> float:
    """mean + k * std of held-out nominal scores (population std)."""
    nominal_scores = _nonempty(nominal_scores)
    return float(nominal_scores.mean() + k * nominal_scores.std())


def nominal_quantile_threshold(nominal_scores: np.ndarray, quantile: float = 0.99) -> float:
    """The given quantile (linear interpolation) of held-out nominal scores."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"threshold.quantile={quantile} must be in [0, 1]")
    return float(np.quantile(_nonempty(nominal_scores), quantile))


def _nonempty(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no held-out nominal scores: raise threshold.validation_fraction or add train images")
    return values


@dataclass
class Decisions:
    """Confusion matrix and derived rates of ``score >= threshold`` against labels."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    accuracy: float


def decide(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Decisions:
    labels = np.asarray(labels).astype(bool).ravel()
    predicted = np.asarray(scores).ravel() >= threshold
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    tn = int(np.sum(~predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return Decisions(float(threshold), tp, fp, tn, fn, precision, recall, f1, (tp + tn) / len(labels))


def segment(anomaly_map: np.ndarray, pixel_threshold: float, min_area: int = 0) -> np.ndarray:
    """Pixels ``>= pixel_threshold``, dropping 8-connected regions smaller than ``min_area`` pixels."""
    mask = np.asarray(anomaly_map) >= pixel_threshold
    if min_area <= 1 or not mask.any():
        return mask
    regions, count = scipy.ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[regions]


def _pixel_f1_optimal(masks: np.ndarray | None, maps: np.ndarray) -> float | None:
    if masks is None or not masks.any():
        return None
    return f1_optimal_threshold(masks.ravel(), maps.ravel())


class ThresholdRule:
    """Turns scores into an image threshold and a pixel threshold (for segmentation).

    ``validation_fraction`` of ``train/good`` is held out of the memory bank when the rule
    needs nominal scores; ``min_defect_area`` (pixels at crop resolution) drops small regions.
    """

    name = "base"
    optimistic = False

    def __init__(self, validation_fraction: float = 0.0, min_defect_area: int = 0) -> None:
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"threshold.validation_fraction={validation_fraction} must be in [0, 1)")
        if min_defect_area < 0:
            raise ValueError(f"threshold.min_defect_area={min_defect_area} must be >= 0")
        self.validation_fraction = validation_fraction
        self.min_defect_area = min_defect_area

    def thresholds(self, nominal_scores: np.ndarray | None, nominal_maps: np.ndarray | None,
                   labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None,
                   maps: np.ndarray) -> tuple[float, float | None]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"rule": self.name, "optimistic": self.optimistic, "validation_fraction": self.validation_fraction,
                "min_defect_area": self.min_defect_area}


class F1OptimalThreshold(ThresholdRule):
    """Best-F1 thresholds on the test set itself: an optimistic upper bound, not a deployable rule."""

    name = "f1_optimal"
    optimistic = True

    def __init__(self, min_defect_area: int = 0) -> None:
        super().__init__(0.0, min_defect_area)

    def thresholds(self, nominal_scores, nominal_maps, labels, scores, masks, maps):
        return f1_optimal_threshold(labels, scores), _pixel_f1_optimal(masks, maps)


def _check_held_out(rule: str, validation_fraction: float) -> None:
    """A rule fitted on held-out nominal images needs some held out: refused when built, not after the fit."""
    if validation_fraction == 0:
        raise ValueError(f"threshold.validation_fraction=0 but threshold={rule} fits its threshold on held-out "
                         "nominal images: set threshold.validation_fraction > 0 (e.g. 0.1)")


class NominalSigmaThreshold(ThresholdRule):
    """mean + k * std of held-out nominal image scores (and, for pixels, of their map values)."""

    name = "nominal_sigma"

    def __init__(self, k: float = 3.0, validation_fraction: float = 0.1, min_defect_area: int = 0) -> None:
        super().__init__(validation_fraction, min_defect_area)
        if k < 0:
            raise ValueError(f"threshold.k={k} must be >= 0 (standard deviations above the mean)")
        _check_held_out(self.name, validation_fraction)
        self.k = k

    def thresholds(self, nominal_scores, nominal_maps, labels, scores, masks, maps):
        return (nominal_sigma_threshold(_needed(nominal_scores), self.k),
                nominal_sigma_threshold(_needed(nominal_maps), self.k))

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k}


class NominalQuantileThreshold(ThresholdRule):
    """A quantile of held-out nominal image scores (and, for pixels, of their map values)."""

    name = "nominal_quantile"

    def __init__(self, quantile: float = 0.99, validation_fraction: float = 0.1, min_defect_area: int = 0) -> None:
        super().__init__(validation_fraction, min_defect_area)
        nominal_quantile_threshold(np.zeros(1), quantile)  # validates the quantile now, before any work
        _check_held_out(self.name, validation_fraction)
        self.quantile = quantile

    def thresholds(self, nominal_scores, nominal_maps, labels, scores, masks, maps):
        return (nominal_quantile_threshold(_needed(nominal_scores), self.quantile),
                nominal_quantile_threshold(_needed(nominal_maps), self.quantile))

    def describe(self) -> dict:
        return {**super().describe(), "quantile": self.quantile}


def _needed(values: np.ndarray | None) -> np.ndarray:
    if values is None:
        raise ValueError("this threshold rule needs held-out nominal images: set threshold.validation_fraction > 0")
    return values
