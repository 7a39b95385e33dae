"""Tests of core.metrics: hand-computed values and an independent brute-force AUPRO."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.metrics import aupro, compute_metrics, f1_max, image_auroc, pixel_auroc, pixel_f1_max

# --------------------------------------------------------------------------- image level


def test_image_auroc_hand_example() -> None:
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won are 0.35>0.1, 0.8>0.1, 0.8>0.4;
    # 0.35<0.4 is lost -> 3 / 4 = 0.75.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_image_auroc_ties_count_half() -> None:
    # positive 0.5 vs negatives 0.5 (tie, 1/2) and 0.2 (won, 1) -> 1.5 / 2 = 0.75.
    assert image_auroc(np.array([0, 0, 1]), np.array([0.5, 0.2, 0.5])) == pytest.approx(0.75)


def test_f1_max_hand_example() -> None:
    # labels [0,0,1,1], scores [0.1,0.4,0.35,0.8]; predict positive when score >= t:
    #   t=0.8 : TP1 FP0 FN1 -> P=1,   R=1/2 -> F1 = 2/3
    #   t=0.4 : TP1 FP1 FN1 -> P=1/2, R=1/2 -> F1 = 1/2
    #   t=0.35: TP2 FP1 FN0 -> P=2/3, R=1   -> F1 = 2*(2/3)/(5/3) = 4/5
    #   t=0.1 : TP2 FP2 FN0 -> P=1/2, R=1   -> F1 = 2/3
    # best = 0.8
    assert f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.8)


def test_f1_max_perfect_and_all_positive() -> None:
    assert f1_max(np.array([0, 1, 1]), np.array([0.0, 0.9, 0.7])) == pytest.approx(1.0)
    # all positives: the threshold at the lowest score gives P=1, R=1 whatever the scores, so F1-max
    # measures nothing there and is not computable (issue 26: it read as 100 %).
    assert f1_max(np.array([1, 1]), np.array([0.3, 0.2])) is None


def test_image_metrics_single_class_give_none() -> None:
    assert image_auroc(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3])) is None
    assert image_auroc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    assert f1_max(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3])) is None


def test_image_metrics_return_python_floats() -> None:
    value = image_auroc(np.array([0, 1]), np.array([0.2, 0.7]))
    assert type(value) is float
    assert type(f1_max(np.array([0, 1]), np.array([0.2, 0.7]))) is float


def test_image_shape_validation() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        image_auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="1-D"):
        f1_max(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))


# --------------------------------------------------------------------------- pixel AUROC / F1


def test_pixel_auroc_matches_sklearn_on_flattened() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((4, 10, 12)) > 0.8
    maps = rng.random((4, 10, 12)) + masks * 0.3
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_none_without_positive_pixels() -> None:
    masks = np.zeros((2, 5, 5), dtype=bool)
    maps = np.random.default_rng(1).random((2, 5, 5))
    assert pixel_auroc(masks, maps) is None
    assert pixel_f1_max(masks, maps) is None
    assert aupro(masks, maps) is None


def test_pixel_f1_max_hand_example() -> None:
    # 4 pixels, one anomalous with score 0.6, normals 0.1, 0.7, 0.2:
    #   t=0.7: TP0 -> F1 0;  t=0.6: TP1 FP1 -> P=1/2, R=1 -> F1 = 2/3;  lower t: more FP -> lower.
    masks = np.array([[[False, True], [False, False]]])
    maps = np.array([[[0.1, 0.6], [0.7, 0.2]]])
    assert pixel_f1_max(masks, maps) == pytest.approx(2 / 3)


def test_pixel_shape_validation() -> None:
    with pytest.raises(ValueError, match="3-D"):
        pixel_auroc(np.zeros((5, 5), dtype=bool), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="differ in shape"):
        aupro(np.zeros((1, 5, 5), dtype=bool), np.zeros((1, 5, 4)))


# --------------------------------------------------------------------------- brute-force AUPRO


def _flood_fill_regions(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of one 2-D mask, each returned as a boolean mask (no scipy)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start_r in range(height):
        for start_c in range(width):
            if not mask[start_r, start_c] or seen[start_r, start_c]:
                continue
            region = np.zeros_like(mask, dtype=bool)
            stack = [(start_r, start_c)]
            seen[start_r, start_c] = True
            while stack:
                r, c = stack.pop()
                region[r, c] = True
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        nr, nc = r + dr, c + dc
                        if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                            seen[nr, nc] = True
                            stack.append((nr, nc))
            regions.append(region)
    return regions


def _trapezoid_up_to(points: list[tuple[float, float]], limit: float) -> float:
    """Area under a polyline of (x, y) points with non-decreasing x, cut at x = limit."""
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < limit:
                y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_limit) * (limit - x0)
            break
    return area


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """AUPRO straight from its definition: one pass over the images per distinct threshold."""
    regions = []  # (image index, boolean region mask)
    for i, mask in enumerate(masks):
        regions += [(i, region) for region in _flood_fill_regions(mask)]
    normal = ~masks
    num_normal = np.sum(normal)
    points = [(0.0, 0.0)]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= threshold
        fpr = np.sum(above & normal) / num_normal
        overlaps = [np.sum(above[i] & region) / np.sum(region) for i, region in regions]
        points.append((float(fpr), float(np.mean(overlaps))))
    return _trapezoid_up_to(points, limit) / limit


def _hand_placed_masks() -> np.ndarray:
    """3 images of 12x12 with regions of varied size, incl. diagonal-only contacts."""
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 1:4, 1:4] = True  # 3x3 square
    masks[0, 4, 4] = True  # touches the square only diagonally -> same region
    masks[0, 8:11, 7] = True  # separate vertical bar
    masks[1, 0, 11] = True  # single pixel in a corner
    masks[1, 5:9, 2:6] = True  # 4x4 block
    masks[1, 9, 6] = True  # diagonal contact with the block
    masks[1, 10, 7] = True  # diagonal chain continues
    # image 2 stays fully normal: its pixels still count as normal pixels for the FPR
    return masks


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force_random_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _hand_placed_masks()
    maps = rng.random(masks.shape) + 0.5 * masks
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force_integer_scores_with_ties(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = _hand_placed_masks()
    # few distinct integer values -> many ties, some shared between normal and region pixels
    maps = rng.integers(0, 6, size=masks.shape) + 2 * masks.astype(int)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force_random_masks(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    masks = rng.random((3, 12, 12)) > 0.85  # many small, oddly touching regions
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)  # rounding creates ties
    for limit in (0.3, 0.05, 1.0):
        expected = brute_force_aupro(masks, maps, limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_brute_force_flood_fill_uses_8_connectivity() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    mask[3, 3] = True
    assert len(_flood_fill_regions(mask)) == 2


# --------------------------------------------------------------------------- hand AUPRO cases


def _single_image_mask() -> np.ndarray:
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 1:3, 1:4] = True
    return mask


def test_aupro_perfect_map_is_one() -> None:
    # Curve (0,0) -> (0,1) at t=1 -> (1,1): area 0.3 * 1 over [0, 0.3], / 0.3 = 1.
    mask = _single_image_mask()
    assert aupro(mask, mask.astype(float)) == pytest.approx(1.0)


def test_aupro_constant_map() -> None:
    # All pixels tie -> one threshold: curve (0,0) -> (1,1), so PRO = FPR.
    # Area over [0, 0.3] = 0.3^2 / 2 = 0.045, / 0.3 = 0.15.
    mask = _single_image_mask()
    assert aupro(mask, np.full(mask.shape, 0.42)) == pytest.approx(0.15)


def test_aupro_inverted_map_is_zero() -> None:
    # Normal pixels score 1, defect 0: curve (0,0) -> (1,0) -> (1,1); nothing below FPR 0.3.
    mask = _single_image_mask()
    assert aupro(mask, (~mask).astype(float)) == pytest.approx(0.0, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # Defect pixels: A = (0,0) alone, B = (1,1),(1,2),(1,3); A touches B only diagonally.
    # Scores: A 1.0, B 0.0, the 12 normal pixels 0.5.
    #   8-conn: one region of 4 pixels. t=1: FPR 0, PRO 1/4; t=0.5: FPR 1, PRO 1/4; t=0: (1, 1).
    #           area over [0, 0.3] = 0.3 * 1/4 -> AUPRO 0.25.
    #   4-conn would give two regions: PRO = mean(1, 0) = 1/2 -> AUPRO 0.5.
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = True
    mask[0, 1, 1:4] = True
    maps = np.full(mask.shape, 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1:4] = 0.0
    assert aupro(mask, maps) == pytest.approx(0.25)


def test_aupro_regions_do_not_merge_across_images() -> None:
    # Image 0 defect at its bottom-right corner, image 1 at its top-left: stacked they would
    # not touch anyway, but each must be its own region. Region 0 detected first (score 1),
    # region 1 last (score 0), normals 0.5:
    #   t=1: FPR 0, PRO 1/2 -> t=0.5: FPR 1, PRO 1/2 -> AUPRO = 0.5.
    mask = np.zeros((2, 3, 3), dtype=bool)
    mask[0, 2, 2] = mask[1, 0, 0] = True
    maps = np.full(mask.shape, 0.5)
    maps[0, 2, 2] = 1.0
    maps[1, 0, 0] = 0.0
    assert aupro(mask, maps) == pytest.approx(0.5)


def test_aupro_interpolates_at_limit() -> None:
    # 1 defect pixel and 10 normal pixels; normals: one at 0.9, nine at 0.1; the defect ties at 0.1.
    # Curve: (0,0) -> t=0.9: (0.1, 0) -> t=0.1: (1, 1)  [defect switches with the tied normals].
    # At FPR 0.3 the last segment gives PRO (0.3-0.1)/0.9 = 2/9; area = 0.5 * (2/9) * 0.2 = 1/45,
    # / 0.3 -> AUPRO 2/27. With limit 0.1 (a curve point): area 0 -> 0.
    mask = np.zeros((1, 1, 11), dtype=bool)
    mask[0, 0, 10] = True
    maps = np.array([[[0.9] + [0.1] * 9 + [0.1]]])
    assert aupro(mask, maps) == pytest.approx(2 / 27)
    assert aupro(mask, maps, fpr_limit=0.1) == pytest.approx(0.0, abs=1e-12)


def test_aupro_none_without_normal_pixels_and_bad_limit() -> None:
    mask = np.ones((1, 3, 3), dtype=bool)
    assert aupro(mask, np.random.default_rng(0).random(mask.shape)) is None
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(_single_image_mask(), np.zeros((1, 6, 6)), fpr_limit=0.0)


# --------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_without_masks() -> None:
    result = compute_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), None, None)
    assert result == {
        "image_auroc": pytest.approx(0.75),
        "image_f1_max": pytest.approx(0.8),
        "pixel_auroc": None,
        "pixel_f1_max": None,
        "aupro": None,
        "aupro_defect_images": None,
    }


def test_compute_metrics_with_masks() -> None:
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[1] = _single_image_mask()[0]
    maps = masks.astype(float)
    result = compute_metrics(np.array([0, 1]), np.array([0.1, 0.9]), maps, masks)
    assert set(result) == {"image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro", "aupro_defect_images"}
    assert all(type(v) is float and v == pytest.approx(1.0) for v in result.values())


def test_compute_metrics_masks_without_positives_give_none() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(3).random(masks.shape)
    result = compute_metrics(np.array([0, 1]), np.array([0.1, 0.9]), maps, masks)
    assert all(result[key] is None for key in ("pixel_auroc", "pixel_f1_max", "aupro", "aupro_defect_images"))
    assert result["image_auroc"] == pytest.approx(1.0)


def test_compute_metrics_count_mismatch() -> None:
    with pytest.raises(ValueError, match="masks/maps"):
        compute_metrics(
            np.array([0, 1, 1]),
            np.array([0.1, 0.2, 0.3]),
            np.zeros((2, 3, 3)),
            np.zeros((2, 3, 3), dtype=bool),
        )


def test_aupro_over_defect_images_ignores_nominal_images() -> None:
    """The official PatchCore README's PRO: only anomalous images enter, so false positives on nominal
    images do not count; equal to AU-PRO computed on the defect images alone, and never below it here."""
    from core.metrics import aupro, aupro_defect_images

    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[2, 4:8, 4:8] = masks[3, 9:13, 2:6] = True
    maps = rng.random((4, 16, 16))
    maps[masks] += 0.5
    maps[0, 0, 0] = maps[1, 5, 5] = 5.0  # hot pixels on nominal images: false positives for AU-PRO
    assert aupro_defect_images(masks, maps) == pytest.approx(aupro(masks[2:], maps[2:]))
    assert aupro_defect_images(masks, maps) >= aupro(masks, maps)
    assert aupro_defect_images(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))) is None


# --------------------------------------------------------------------------- pixel_metrics: one sort, same values


def _maps_and_masks(seed: int, ties: bool, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Six 20x20 maps: two nominal, four with one or two regions (one touching another diagonally)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 20, 20), bool)
    masks[2, 3:9, 4:7] = True
    masks[3, 10:14, 10:16] = masks[3, 14:16, 16:18] = True   # diagonal touch: one 8-connected region
    masks[4, 0:2, 0:20] = masks[4, 15:19, 2:5] = True
    masks[5, 12:20, 12:20] = True
    maps = rng.integers(0, 6, masks.shape) if ties else rng.random(masks.shape)
    maps = (maps + masks * (1 if ties else 0.25)).astype(dtype)   # defects score higher, not perfectly
    return masks, maps


@pytest.mark.parametrize(("seed", "ties", "dtype"), [(0, False, np.float64), (1, True, np.float64),
                                                       (2, False, np.float32), (3, True, np.float32)])
def test_pixel_metrics_equal_the_one_metric_references(seed, ties, dtype) -> None:
    """pixel_metrics sorts once; each value equals its reference (sklearn, MVTec's AU-PRO) within rounding."""
    from core.metrics import aupro_defect_images, pixel_metrics

    masks, maps = _maps_and_masks(seed, ties, dtype)
    found = pixel_metrics(masks, maps)
    expected = {"pixel_auroc": pixel_auroc(masks, maps), "pixel_f1_max": pixel_f1_max(masks, maps),
                "aupro": aupro(masks, maps), "aupro_defect_images": aupro_defect_images(masks, maps)}
    assert expected["aupro"] != expected["aupro_defect_images"]      # the nominal maps' pixels count in one
    for key, value in expected.items():
        assert type(found[key]) is float and found[key] == pytest.approx(value, abs=1e-12), key
    assert found["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pixel_metrics_at_another_fpr_limit_and_its_none_cases() -> None:
    from core.metrics import aupro_defect_images, pixel_metrics

    masks, maps = _maps_and_masks(4, False)
    found = pixel_metrics(masks, maps, fpr_limit=0.05)
    assert found["aupro"] == pytest.approx(aupro(masks, maps, fpr_limit=0.05), abs=1e-12)
    assert found["aupro_defect_images"] == pytest.approx(aupro_defect_images(masks, maps, 0.05), abs=1e-12)
    assert pixel_metrics(np.zeros((2, 4, 4), bool), maps[:2, :4, :4]) == dict.fromkeys(found)
    every_pixel_defect = pixel_metrics(np.ones((1, 3, 3), bool), maps[:1, :3, :3])
    assert every_pixel_defect == {"pixel_auroc": None, "pixel_f1_max": 1.0, "aupro": None,
                                  "aupro_defect_images": None}
    with pytest.raises(ValueError, match="fpr_limit"):
        pixel_metrics(masks, maps, fpr_limit=1.5)
