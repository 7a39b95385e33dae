"""Intervals that count the test images (experiments/reporting/intervals.py, stats.paired / verdict / signed):
the vectorised paired bootstrap against a plain-Python loop over the same draws, DeLong's test against sklearn and
against its definition, the two intervals against each other on synthetic scores, the pairing chosen from real
run folders (and the seed-level fallback, labelled), the verdict rule and the printed bounds near 0 and ±0.5."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from experiments.reporting.intervals import LEVEL, Paired, auroc, bootstrap, delong
from experiments.reporting.stats import EQUIVALENT, paired, signed, verdict


def _synthetic(rng: np.random.Generator, n0: int, n1: int, shift: float, correlation: float = 0.8,
               ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two correlated score vectors (the arm separates the classes by ``shift`` more)."""
    labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    common = rng.normal(size=n0 + n1)
    base = common + np.sqrt(1 - correlation ** 2) * rng.normal(size=n0 + n1) + 1.0 * labels
    arm = common + np.sqrt(1 - correlation ** 2) * rng.normal(size=n0 + n1) + (1.0 + shift) * labels
    if ties:
        base, arm = np.round(base, 1), np.round(arm, 1)
    return labels, base, arm


def _pair(labels, base, arm, prefix: str = "img") -> Paired:
    order = np.argsort([f"{prefix}{i:04d}" for i in range(len(labels))], kind="stable")
    paths = tuple(f"{prefix}{i:04d}" for i in order)
    return Paired(paths, np.asarray(labels)[order], np.asarray(base, float)[order], np.asarray(arm, float)[order])


# ----------------------------------------------------------------------------- the AUROC itself


def test_each_auroc_equals_sklearn_with_ties() -> None:
    labels, base, arm = _synthetic(np.random.default_rng(1), 40, 60, 0.3, ties=True)
    assert len(np.unique(base)) < len(base)  # ties present
    result = delong(labels, base, arm)
    assert result["auroc_base"] == pytest.approx(roc_auc_score(labels, base), abs=1e-12)
    assert result["auroc_arm"] == pytest.approx(roc_auc_score(labels, arm), abs=1e-12)
    assert auroc(labels, base) == pytest.approx(roc_auc_score(labels, base), abs=1e-12)


def test_delong_variance_equals_its_definition() -> None:
    """The fast (rank) form of Sun & Xu against DeLong's structural components written as double loops."""
    labels, base, arm = _synthetic(np.random.default_rng(2), 7, 9, 0.5, ties=True)
    negatives, positives = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)

    def psi(x: float, y: float) -> float:  # defect score x against nominal score y
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [[sum(psi(s[i], s[j]) for j in negatives) / len(negatives) for i in positives] for s in (base, arm)]
    v01 = [[sum(psi(s[i], s[j]) for i in positives) / len(positives) for j in negatives] for s in (base, arm)]
    s10, s01 = np.cov(v10), np.cov(v01)
    var = ((s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / len(positives)
           + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / len(negatives))
    result = delong(labels, base, arm)
    assert result["sd"] == pytest.approx(math.sqrt(var), rel=1e-12)
    assert result["diff"] == pytest.approx(np.mean(v10[1]) - np.mean(v10[0]), abs=1e-12)
    z = result["diff"] / result["sd"]
    assert result["p"] == pytest.approx(2 * scipy_stats.norm.sf(abs(z)), rel=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_delong_and_the_paired_bootstrap_agree_on_synthetic_scores(shift: float) -> None:
    """One seed, one category, 100 nominal / 100 defective images: the two 95 % intervals of the AUROC difference
    have widths within 15 % of each other and centres within a tenth of the width."""
    labels, base, arm = _synthetic(np.random.default_rng(3), 100, 100, shift)
    check = delong(labels, base, arm)
    result = bootstrap({"c": [_pair(labels, base, arm)]})
    low, high = result["low"] / 100, result["high"] / 100
    width, delong_width = high - low, check["high"] - check["low"]
    assert abs(width - delong_width) / delong_width < 0.15, (width, delong_width)
    assert abs((low + high) / 2 - (check["low"] + check["high"]) / 2) < 0.1 * delong_width
    assert result["mean"] / 100 == pytest.approx(check["diff"], abs=1e-12)


# ----------------------------------------------------------------------------- the bootstrap against a plain loop


def _plain_auroc(nominal: list[float], defect: list[float]) -> float:
    wins = sum(1.0 if d > n else 0.5 if d == n else 0.0 for n in nominal for d in defect)
    return wins / (len(nominal) * len(defect))


def test_bootstrap_equals_a_plain_python_loop_over_the_same_draws() -> None:
    """Two categories (one with a test set per seed), two seeds, ties: the same Generator draws in the order the
    docstring gives, every replicate recomputed by loops: identical replicates and intervals, and the pooled
    difference is the mean of the per-category ones replicate by replicate."""
    rng = np.random.default_rng(4)
    pairs = {"b": [], "a": []}
    shared = _synthetic(rng, 5, 6, 0.4, ties=True)
    for seed in range(2):
        _, base_b, arm_b = _synthetic(rng, 5, 6, 0.4, ties=True)
        pairs["b"].append(_pair(shared[0], base_b, arm_b, "b/"))
        labels_a, base_a, arm_a = _synthetic(rng, 4, 3, -0.2)
        pairs["a"].append(_pair(labels_a, base_a, arm_a, f"a{seed}/"))  # a seeded split: own images per seed
    replicates = 300
    result = bootstrap(pairs, replicates=replicates, seed=11)

    draws = np.random.default_rng(11)
    images = {}
    for category in ("a", "b"):  # sorted categories, each distinct test set in order of first appearance
        for pair in pairs[category]:
            if pair.paths not in images:
                n0, n1 = int((pair.labels == 0).sum()), int((pair.labels == 1).sum())
                images[pair.paths] = (draws.integers(0, n0, (replicates, n0)), draws.integers(0, n1, (replicates, n1)))
    seeds = draws.integers(0, 2, (replicates, 2))
    pooled, per_category = [], {"a": [], "b": []}
    for b in range(replicates):
        means = {}
        for category in ("a", "b"):
            diffs = []
            for k in seeds[b]:
                pair = pairs[category][k]
                pick0, pick1 = images[pair.paths]
                values = []
                for scores in (pair.arm, pair.base):
                    nominal, defect = scores[pair.labels == 0], scores[pair.labels == 1]
                    values.append(_plain_auroc([nominal[i] for i in pick0[b]], [defect[j] for j in pick1[b]]))
                diffs.append(values[0] - values[1])
            means[category] = 100 * sum(diffs) / len(diffs)
            per_category[category].append(means[category])
        pooled.append((means["a"] + means["b"]) / 2)
    np.testing.assert_allclose(result["replicates"], pooled, rtol=0, atol=1e-10)
    tail = 100 * (1 - LEVEL) / 2
    assert [result["low"], result["high"]] == pytest.approx(list(np.percentile(pooled, [tail, 100 - tail])), abs=1e-10)
    for category in ("a", "b"):
        bounds = np.percentile(per_category[category], [tail, 100 - tail])
        assert [result["categories"][category]["low"], result["categories"][category]["high"]] == \
            pytest.approx(list(bounds), abs=1e-10)
    observed = {c: 100 * np.mean([_plain_auroc(list(p.arm[p.labels == 0]), list(p.arm[p.labels == 1]))
                                  - _plain_auroc(list(p.base[p.labels == 0]), list(p.base[p.labels == 1]))
                                  for p in pairs[c]]) for c in pairs}
    assert result["mean"] == pytest.approx((observed["a"] + observed["b"]) / 2, abs=1e-10)
    assert bootstrap(pairs, replicates=replicates, seed=11)["low"] == result["low"]  # seeded: the same bounds


def test_bootstrap_of_a_study_sized_comparison_is_fast() -> None:
    """2000 replicates over 4 categories x 3 seeds x 150 images (50 nominal / 100 defective)."""
    rng = np.random.default_rng(5)
    pairs = {}
    for category in "wxyz":
        labels = _synthetic(rng, 50, 100, 0.0)[0]
        pairs[category] = [_pair(labels, *_synthetic(rng, 50, 100, 0.2)[1:], category) for _ in range(3)]
    start = time.perf_counter()
    result = bootstrap(pairs)
    assert time.perf_counter() - start < 1.0
    assert result["low"] < result["mean"] < result["high"] and len(result["replicates"]) == 2000


# ----------------------------------------------------------------------------- paired() on run folders


def _run(folder: Path, seed: int, category_scores: dict[str, tuple[np.ndarray, np.ndarray]],
         auroc_offset: float = 0.0, scores_csv: bool = True) -> dict:
    """A run folder with scores.csv; returns its tidy rows' fields (as data.tidy makes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    if scores_csv:
        with (folder / "scores.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["category", "path", "defect_type", "label", "image_score"])
            writer.writeheader()
            for category, (labels, scores) in category_scores.items():
                writer.writerows({"category": category, "path": f"/d/{category}/{i}.png", "label": int(label),
                                  "defect_type": "crack" if label else "good", "image_score": float(score)}
                                 for i, (label, score) in enumerate(zip(labels, scores)))
    for category, (labels, scores) in category_scores.items():
        rows.append({"seed": seed, "category": category, "run_dir": str(folder),
                     "image_auroc": roc_auc_score(labels, scores) + auroc_offset, "pixel_auroc": 0.9 + 0.01 * seed})
    (folder / "results.json").write_text(json.dumps({"complete": True}))
    return rows


def _arm(root: Path, name: str, seeds: list[int], shift: float, **kwargs) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        scores = {}
        for k, category in enumerate(("bottle", "screw")):
            labels, base, arm = _synthetic(np.random.default_rng(100 * k + seed), 30, 40, shift)
            scores[category] = (labels, arm if name != "baseline" else base)
        rows += _run(root / name / str(seed), seed, scores, **kwargs)
    return pd.DataFrame(rows)


def test_paired_bootstraps_image_auroc_and_labels_the_seed_level_metrics(tmp_path) -> None:
    base, arm = _arm(tmp_path, "baseline", [0, 1, 2], 0.0), _arm(tmp_path, "arm", [0, 1, 2], 0.8)
    diff = paired(base, arm, "image_auroc", ["bottle", "screw"])
    assert diff["method"] == "bootstrap" and diff["n"] == 3
    per_seed = (arm.set_index(["seed", "category"])["image_auroc"] - base.set_index(["seed", "category"])[
        "image_auroc"]) * 100
    assert diff["mean"] == pytest.approx(per_seed.mean(), abs=1e-9)  # the point estimate is results.json's
    assert diff["pairing"].startswith("paired bootstrap over 140 test images") and "same seed, 3 seeds" in \
        diff["pairing"]
    assert diff["low"] > 0 and verdict(diff) == "higher"
    assert set(diff["categories"]) == {"bottle", "screw"}
    assert diff["seed_sd"] == pytest.approx(np.std(per_seed.groupby(level="seed").mean(), ddof=1), abs=1e-9)
    # pixel AUROC: no per-image scores; the t interval over the 3 per-seed means, labelled as such
    pixel = paired(base, arm, "pixel_auroc", ["bottle", "screw"])
    assert pixel["method"] == "seed" and pixel["mean"] == pytest.approx(0.0, abs=1e-9) and pixel["n"] == 3
    assert pixel["pairing"].startswith("seed level, test images held fixed (no per-image scores for this metric)")


def test_an_arm_on_one_seed_pairs_with_the_baseline_at_that_seed(tmp_path) -> None:
    """A one-seed arm meets the baseline at its seed: an arm identical to the baseline there differs by exactly 0
    (against the mean over the baseline's seeds it would not); only a seed the baseline lacks pairs with every
    baseline seed."""
    base = _arm(tmp_path, "baseline", [0, 1, 2], 0.0)
    same = base[base.seed == 0].assign(arm="squared distance")  # the baseline's own seed-0 runs: identical scores
    diff = paired(base, same, "image_auroc", ["bottle", "screw"])
    assert diff["method"] == "bootstrap" and diff["n"] == 1 and "same seed, 1 seed" in diff["pairing"]
    assert (diff["mean"], diff["low"], diff["high"]) == (0.0, 0.0, 0.0) and verdict(diff) == EQUIVALENT
    assert base.groupby("seed")["image_auroc"].mean().nunique() > 1  # the mean over seeds would not give 0
    arm = _arm(tmp_path, "full bank", [7], 0.0)
    diff = paired(base, arm, "image_auroc", ["bottle", "screw"])
    assert diff["method"] == "bootstrap" and diff["n"] == 3
    assert "the arm's one run against each of 3 baseline seeds" in diff["pairing"]
    expected = 100 * (arm["image_auroc"].mean() - base["image_auroc"].mean())
    assert diff["mean"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("kwargs, why", [({"scores_csv": False}, "no scores.csv"),
                                         ({"auroc_offset": 0.01}, "does not reproduce results.json")])
def test_runs_whose_scores_cannot_be_paired_fall_back_to_the_seed_level(tmp_path, kwargs, why) -> None:
    base, arm = _arm(tmp_path, "baseline", [0, 1], 0.0), _arm(tmp_path, "arm", [0, 1], 0.5, **kwargs)
    diff = paired(base, arm, "image_auroc", ["bottle", "screw"])
    assert diff["method"] == "seed" and diff["n"] == 2 and why in diff["pairing"]
    per_seed = [100 * (arm[arm.seed == s]["image_auroc"].mean() - base[base.seed == s]["image_auroc"].mean())
                for s in (0, 1)]
    half = scipy_stats.t.ppf(0.975, 1) * np.std(per_seed, ddof=1) / math.sqrt(2)
    assert [diff["low"], diff["high"]] == pytest.approx([np.mean(per_seed) - half, np.mean(per_seed) + half])


# ----------------------------------------------------------------------------- the words and the numbers


@pytest.mark.parametrize("low, high, word", [
    (1e-6, 2.0, "higher"), (0.0, 2.0, "not resolved"), (-2.0, -1e-6, "lower"), (-2.0, 0.0, "not resolved"),
    (0.1, 0.3, "higher"),  # excludes 0 and lies in the band: a (small) change
    (-0.5, 0.5, EQUIVALENT), (-0.2, 0.1, EQUIVALENT), (-0.5, 0.5000001, "not resolved"),
    (-0.5000001, 0.4, "not resolved"), (-3.0, 4.0, "not resolved"), (math.nan, math.nan, "not resolved"),
    # float noise of averaging is on the edge, as printed: -0.5000000000000004 shows as -0.5
    (-0.5000000000000004, 0.5000000000000004, EQUIVALENT), (4e-16, 1.0, "not resolved")])
def test_the_verdict_follows_the_interval(low: float, high: float, word: str) -> None:
    assert verdict({"mean": 0.0, "low": low, "high": high}) == word


@pytest.mark.parametrize("value, text", [
    (3.14159, "+3.1"), (-2.96, "-3.0"), (0.0, "0.0"), (0.004, "+0.004"), (-0.004, "-0.004"), (0.04999, "+0.05"),
    (0.5004, "+0.5004"), (0.4996, "+0.4996"), (-0.5004, "-0.5004"), (-0.4996, "-0.4996"), (0.45, "+0.45"),
    (0.5, "+0.5"), (1e-7, "+0.0000001"), (-0.5000000000000004, "-0.5"), (4e-16, "0.0"), (math.nan, "-")])
def test_printed_bounds_keep_their_side_of_zero_and_of_the_band(value: float, text: str) -> None:
    assert signed(value) == text
    if not math.isnan(value) and abs(value) > 1e-9 and abs(abs(value) - 0.5) > 1e-9:
        shown = float(text)
        for edge in (0.0, 0.5, -0.5):
            assert np.sign(shown - edge) == np.sign(value - edge)


def test_types_kept_out_of_the_main_metrics_are_kept_out_of_the_bootstrap(tmp_path) -> None:
    """ELPV's uncertain cells are in scores.csv (label 1, their own type) but out of results.json's AUROC: the
    bootstrap leaves them out by the run's own record, so it pairs (rather than falling back to seed level)."""
    frames = []
    for name, shift in (("baseline", 0.0), ("arm", 0.8)):
        rows = []
        for seed in (0, 1):
            folder = tmp_path / name / str(seed)
            labels, base, arm = _synthetic(np.random.default_rng(seed), 30, 40, shift)
            scores = arm if name == "arm" else base
            rows += _run(folder, seed, {"poly": (labels, scores)})
            uncertain = np.random.default_rng(50 + seed).normal(size=12)  # would move the AUROC if counted
            with (folder / "scores.csv").open("a", newline="") as handle:
                csv.writer(handle).writerows(["poly", f"/d/poly/u{i}.png", "uncertain_1_3", 1, float(v)]
                                             for i, v in enumerate(uncertain))
            (folder / "results.json").write_text(json.dumps({"complete": True, "categories": {"poly": {
                "excluded_from_main_metrics": {"uncertain_1_3": {"image_auroc": 0.5, "n_images": 12}}}}}))
        frames.append(pd.DataFrame(rows))
    diff = paired(frames[0], frames[1], "image_auroc", ["poly"])
    assert diff["method"] == "bootstrap" and diff["pairing"].startswith("paired bootstrap over 70 test images")
