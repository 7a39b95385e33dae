"""Turning a detector's predictions into the run record's numbers: metrics, threshold decisions, and the
seeded hold-out of nominal images that a threshold rule is fitted on."""

from __future__ import annotations

import numpy as np

from core.data import Sample
from core.detector import Predictions
from core.metrics import compute_metrics
from core.thresholds import ThresholdRule, decide


def split_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded ``fraction`` of the nominal training images; they never enter the model."""
    if fraction <= 0:
        return samples, []
    count = max(1, round(fraction * len(samples)))
    if count >= len(samples):
        raise ValueError(f"threshold.validation_fraction={fraction} leaves no training image of {len(samples)}: "
                         f"lower it or add train/good images")
    held = set(np.random.default_rng(seed).permutation(len(samples))[:count].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def pixel_arrays(predictions: Predictions) -> tuple[np.ndarray | None, np.ndarray]:
    """Masks and maps of the images whose masks are known (None when no defect image has one)."""
    with_mask = predictions.has_mask
    if not (with_mask & (predictions.labels == 1)).any():
        return None, predictions.maps
    return predictions.masks[with_mask], predictions.maps[with_mask]


def evaluate(predictions: Predictions) -> tuple[dict, str | None]:
    """Metrics of one category; pixel metrics only over images whose masks are known."""
    masks, maps = pixel_arrays(predictions)
    note = None
    if masks is None:
        note = "no ground-truth masks: pixel metrics not computed"
    elif not predictions.has_mask[predictions.labels == 1].all():
        note = "pixel metrics over the defect types that have masks only"
    return compute_metrics(predictions.labels, predictions.image_scores, maps, masks), note


def apply_threshold(rule: ThresholdRule, nominal: Predictions | None, predictions: Predictions) -> dict:
    """The rule's image/pixel thresholds and the test set's decisions under them."""
    masks, maps = pixel_arrays(predictions)
    image_t, pixel_t = rule.thresholds(
        None if nominal is None else nominal.image_scores, None if nominal is None else nominal.maps,
        predictions.labels, predictions.image_scores, masks, maps)
    decisions = decide(predictions.labels, predictions.image_scores, image_t)
    return {**rule.describe(), "image_threshold": image_t, "pixel_threshold": pixel_t,
            "n_validation": 0 if nominal is None else len(nominal.image_scores),
            "precision": decisions.precision, "recall": decisions.recall, "f1": decisions.f1,
            "accuracy": decisions.accuracy,
            "confusion": {"tp": decisions.tp, "fp": decisions.fp, "tn": decisions.tn, "fn": decisions.fn}}


def score_rows(category: str, predictions: Predictions) -> list[dict]:
    """One scores.csv row per test image."""
    return [
        {"category": category, "path": path, "defect_type": defect, "label": int(label), "image_score": float(score)}
        for path, defect, label, score in zip(predictions.paths, predictions.defect_types, predictions.labels,
                                              predictions.image_scores)
    ]
