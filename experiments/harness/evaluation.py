"""Turning a detector's predictions into the run record's numbers: metrics, threshold decisions, and the
seeded hold-out of nominal images that a threshold rule is fitted on."""

from __future__ import annotations

import dataclasses

import numpy as np

from core.data import Sample
from core.detector import Predictions
from core.metrics import PIXEL_METRICS, compute_metrics, image_auroc
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


def require_finite(scores: np.ndarray, where: str) -> None:
    """Non-finite scores are an error, never a decision (``NaN >= t`` is false: everything would pass as nominal)."""
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {bad.size} image scores of {where} are NaN or infinite: the model "
                         "or its inputs are broken (a damaged bank, non-finite pixels); refit the model")


def pixel_arrays(predictions: Predictions) -> tuple[np.ndarray | None, np.ndarray]:
    """Masks and maps of the images whose masks are known (None when no defect image has one)."""
    with_mask = predictions.has_mask
    if not (with_mask & (predictions.labels == 1)).any():
        return None, predictions.maps
    return predictions.masks[with_mask], predictions.maps[with_mask]


def image_metrics_note(labels) -> str | None:
    """Why the image metrics of a test set are not computable (null): it lacks nominal or defect images, so
    no threshold separates anything (F1-max would read 100 % whatever the scores). None when both are there."""
    labels = np.asarray(labels)
    if not len(labels) or (labels == 0).any() and (labels == 1).any():
        return None
    missing = "nominal test images (test/good)" if (labels == 1).all() else "defect test images (test/<defect_type>)"
    return (f"no {missing}: image AUROC and F1-max are not computable and are recorded as null; add such "
            "images to evaluate this category")


def without_types(predictions: Predictions, excluded: tuple[str, ...]) -> Predictions:
    """The test images whose defect type counts in the main metrics (every one when ``excluded`` is empty)."""
    if not excluded or not predictions.defect_types:
        return predictions
    keep = np.array([defect not in excluded for defect in predictions.defect_types], dtype=bool)
    index = np.flatnonzero(keep)
    return dataclasses.replace(
        predictions, image_scores=predictions.image_scores[index], maps=predictions.maps[index],
        labels=predictions.labels[index], masks=predictions.masks[index], has_mask=predictions.has_mask[index],
        paths=[predictions.paths[i] for i in index] if predictions.paths else [],
        defect_types=[predictions.defect_types[i] for i in index])


def excluded_type_metrics(predictions: Predictions, excluded: tuple[str, ...]) -> dict[str, dict]:
    """Each excluded defect type's image AUROC against the nominal test images (null without one of either)."""
    types = np.array(predictions.defect_types or [""] * len(predictions.labels))
    nominal = predictions.labels == 0
    found = {}
    for defect in excluded:
        chosen = nominal | (types == defect)
        found[defect] = {"image_auroc": image_auroc(predictions.labels[chosen], predictions.image_scores[chosen]),
                         "n_images": int((types == defect).sum()), "n_nominal": int(nominal.sum())}
    return found


def evaluate(predictions: Predictions, excluded: tuple[str, ...] = ()) -> tuple[dict, str | None]:
    """Metrics of one category: image metrics over every test image whose defect type is not in ``excluded``
    (the dataset's ``excluded_from_main_metrics``; each of those gets its own AUROC against the nominal test
    images, under ``excluded_from_main_metrics``), pixel metrics over the images whose masks are known (nominal
    images always are); the note names the defect images left out. The metrics carry ``image_metrics_note``
    (why they are null, or None)."""
    require_finite(predictions.image_scores, "the test set")
    if excluded:
        metrics, note = evaluate(without_types(predictions, excluded))
        return {**metrics, "excluded_from_main_metrics": excluded_type_metrics(predictions, excluded)}, note
    masks, maps = pixel_arrays(predictions)
    labels, scores = predictions.labels, predictions.image_scores
    metrics = {**compute_metrics(labels, scores, None, None), "image_metrics_note": image_metrics_note(labels)}
    if masks is None:
        return metrics, "no ground-truth masks: pixel metrics not computed"
    known = predictions.has_mask
    pixel = compute_metrics(labels[known], scores[known], maps, masks)
    metrics.update({key: pixel[key] for key in PIXEL_METRICS})
    return metrics, _left_out_note(predictions)


def _left_out_note(predictions: Predictions) -> str | None:
    """Which defect images had no mask (per defect type), or None when every one had."""
    missing = (predictions.labels == 1) & ~predictions.has_mask
    if not missing.any():
        return None
    counts: dict[str, list[int]] = {}  # defect type -> [without a mask, images]
    types = predictions.defect_types or ["?"] * len(missing)
    for label, left_out, defect in zip(predictions.labels, missing, types, strict=True):
        if label == 1:
            entry = counts.setdefault(defect, [0, 0])
            entry[0], entry[1] = entry[0] + int(left_out), entry[1] + 1
    parts = ", ".join(f"{name} ({left} of {total})" for name, (left, total) in sorted(counts.items()) if left)
    return (f"pixel metrics over the {int(predictions.has_mask.sum())} of {len(missing)} test images with masks; "
            f"{int(missing.sum())} defect images without a mask left out: {parts}")


def apply_threshold(rule: ThresholdRule, nominal: Predictions | None, predictions: Predictions) -> dict:
    """The rule's image/pixel thresholds and the test set's decisions under them."""
    if nominal is not None:
        require_finite(nominal.image_scores, "the held-out nominal images")
    masks, maps = pixel_arrays(predictions)
    image_t, pixel_t = rule.thresholds(
        None if nominal is None else nominal.image_scores, None if nominal is None else nominal.maps,
        predictions.labels, predictions.image_scores, masks, maps)
    decisions = decide(predictions.labels, predictions.image_scores, image_t)
    n_validation = 0 if nominal is None else len(nominal.image_scores)
    entry = {**rule.describe(), "image_threshold": image_t, "pixel_threshold": pixel_t,
             "n_validation": n_validation,
             "precision": decisions.precision, "recall": decisions.recall, "f1": decisions.f1,
             "accuracy": decisions.accuracy,
             "confusion": {"tp": decisions.tp, "fp": decisions.fp, "tn": decisions.tn, "fn": decisions.fn}}
    if nominal is not None and n_validation < FEW_VALIDATION_IMAGES:
        entry["warning"] = few_validation_warning(n_validation)
    return entry


# Below this many held-out nominal images a nominal rule's threshold is a guess: one image has a standard
# deviation of 0 (mean + k * std is that image's score), a 0.99 quantile of four is their maximum.
FEW_VALIDATION_IMAGES = 5


def few_validation_warning(count: int) -> str:
    return (f"the threshold was fitted on only {count} held-out nominal image{'s' if count != 1 else ''} (fewer "
            f"than {FEW_VALIDATION_IMAGES}): it is not a reliable decision boundary; raise "
            "threshold.validation_fraction or add train/good images")


def score_rows(category: str, predictions: Predictions) -> list[dict]:
    """One scores.csv row per test image."""
    return [
        {"category": category, "path": path, "defect_type": defect, "label": int(label), "image_score": float(score)}
        for path, defect, label, score in zip(predictions.paths, predictions.defect_types, predictions.labels,
                                              predictions.image_scores)
    ]
