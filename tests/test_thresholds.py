"""Threshold rules, confusion matrices and thresholded segmentation on hand-made examples."""

import numpy as np
import pytest

from core.thresholds import (
    F1OptimalThreshold,
    NominalQuantileThreshold,
    NominalSigmaThreshold,
    decide,
    f1_optimal_threshold,
    nominal_quantile_threshold,
    nominal_sigma_threshold,
    segment,
)


def test_f1_optimal_threshold_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.9])
    # t=0.7: TP2 FP0 FN1 -> F1 0.8; t=0.6: TP2 FP1 FN1 -> 0.667; t=0.5: TP3 FP1 -> 6/7=0.857 (best)
    assert f1_optimal_threshold(labels, scores) == 0.5
    assert decide(labels, scores, 0.5).f1 == pytest.approx(6 / 7)


def test_nominal_rules_by_hand() -> None:
    nominal = np.array([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, population std sqrt(1.25)
    assert nominal_sigma_threshold(nominal, k=3) == pytest.approx(2.5 + 3 * np.sqrt(1.25))
    assert nominal_sigma_threshold(nominal, k=0) == pytest.approx(2.5)
    # linear interpolation: position 0.9 * 3 = 2.7 -> 3 + 0.7 * 1 = 3.7
    assert nominal_quantile_threshold(nominal, 0.9) == pytest.approx(3.7)
    assert nominal_quantile_threshold(nominal, 1.0) == 4.0
    with pytest.raises(ValueError, match="validation_fraction"):
        nominal_sigma_threshold(np.array([]))
    with pytest.raises(ValueError, match="threshold.quantile"):
        NominalQuantileThreshold(quantile=1.5)


def test_confusion_matrix_by_hand() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.8, 0.2, 0.9, 0.3, 0.7])
    result = decide(labels, scores, 0.5)
    # predicted anomalous: 0.8 (FP), 0.9 (TP), 0.7 (TP); missed: 0.3 (FN); TN: 0.1, 0.4, 0.2
    assert (result.tp, result.fp, result.tn, result.fn) == (2, 1, 3, 1)
    assert result.precision == pytest.approx(2 / 3) and result.recall == pytest.approx(2 / 3)
    assert result.accuracy == pytest.approx(5 / 7) and result.f1 == pytest.approx(2 / 3)
    none_flagged = decide(labels, scores, 10.0)
    assert none_flagged.precision is None and none_flagged.recall == 0.0


def test_rules_give_image_and_pixel_thresholds() -> None:
    nominal_scores = np.array([1.0, 2.0, 3.0])
    nominal_maps = np.zeros((2, 4, 4))
    nominal_maps[0, 0, 0] = 8.0  # pixel values: thirty-one 0s and one 8 -> mean 0.25
    sigma = NominalSigmaThreshold(k=1.0)
    image_t, pixel_t = sigma.thresholds(nominal_scores, nominal_maps, None, None, None, None)
    assert image_t == pytest.approx(2.0 + np.std([1.0, 2.0, 3.0]))
    assert pixel_t == pytest.approx(0.25 + np.std(nominal_maps))
    quantile = NominalQuantileThreshold(quantile=0.5)
    assert quantile.thresholds(nominal_scores, nominal_maps, None, None, None, None) == (2.0, 0.0)
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        sigma.thresholds(None, None, None, None, None, None)

    labels, scores = np.array([0, 1]), np.array([0.2, 0.9])
    masks = np.zeros((2, 2, 2), bool)
    masks[1, 0, 0] = True
    maps = np.where(masks, 5.0, 1.0)
    optimal = F1OptimalThreshold()
    assert optimal.optimistic and optimal.describe()["optimistic"] is True
    assert optimal.thresholds(None, None, labels, scores, masks, maps) == (0.9, 5.0)


def test_segment_drops_small_regions_with_8_connectivity() -> None:
    anomaly_map = np.zeros((8, 8))
    anomaly_map[1:4, 1:4] = 1.0  # 9 pixels
    anomaly_map[6, 6] = anomaly_map[7, 7] = 1.0  # 2 pixels touching diagonally: one 8-connected region
    assert segment(anomaly_map, 0.5).sum() == 11
    kept = segment(anomaly_map, 0.5, min_area=3)
    assert kept.sum() == 9 and kept[2, 2] and not kept[6, 6]
    assert segment(anomaly_map, 0.5, min_area=2).sum() == 11  # diagonal pair counts as one region of 2
