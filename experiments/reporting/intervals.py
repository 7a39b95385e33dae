"""Intervals that count the test images: the paired bootstrap of an image-AUROC difference between two arms,
and DeLong's test as the independent check of it.

Why a bootstrap over images. Two arms are scored on the same test images, so most of the noise in a difference
of AUROCs is which images happen to be in the test set; a Student-t interval over (seed, category) pairs treats
pairs that share those images as independent draws and says nothing about the images at all. So, per category,
the nominal and the defective test images are resampled separately (each replicate keeps the counts, so the AUROC
stays defined), and the same resampled images score both arms: images are matched by path, and the difference is
taken replicate by replicate.

Why seeds are resampled too (rather than only reported beside it). A result is meant to hold for the method, not
for three lucky coreset projections; each replicate therefore also draws the seeds with replacement (one draw
per replicate, shared by every category: a seed is one run of every category) and averages the per-seed
differences over the drawn seeds. Seeds are paired: the arm's seed s against the baseline's seed s, also for an arm
run on fewer seeds than the baseline (one seed to save time: it meets the baseline at that seed). Only an arm run
once at a seed the baseline lacks is paired with every baseline seed, its difference then being to the baseline's
mean over seeds. With the few seeds of a study (3) this two-stage bootstrap counts the seed
variation only roughly (a resample of 3 values has 10 distinct multisets), so the spread over seeds of the
per-seed differences is returned beside it (``seed_sd``). Where the test images depend on the seed (a seeded
split), each seed's images are resampled on their own.

The pooled difference (mean over categories) is the mean of each replicate's per-category differences: it comes
from the same replicates, never from treating (seed, category) pairs as independent.

AUROC per replicate, vectorised: resampling with replacement is a count per image, and the Mann-Whitney form of
the AUROC is sum_ij c0_i c1_j P_ij / (n0 n1) with P_ij = 1[defect j scores above nominal i] + 1/2 [tie]: for every
replicate at once, ``(counts0 @ P * counts1).sum(1)``. It equals sklearn's roc_auc_score on the resampled images
exactly (tests/test_intervals.py checks it against a plain loop).

Pixel metrics and AU-PRO have no per-image scores in the run record: their differences stay at the seed level
(stats.py), and their ``pairing`` says so.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import stats

# 2000 replicates: the Monte-Carlo error of a 2.5 % percentile is sqrt(0.025 * 0.975 / 2000) = 0.35 % in
# probability, a few hundredths of a point on these intervals (Efron & Tibshirani recommend >= 1000 for percentile
# intervals); the vectorised computation makes 2000 cost well under a second for a comparison.
REPLICATES = 2000
RNG_SEED = 0           # every interval is drawn from the same seeded Generator: a re-run prints the same bounds
LEVEL = 0.95
AGREEMENT = 1e-6       # an AUROC recomputed from scores.csv must equal results.json's to this, or it is not used


@dataclass
class Paired:
    """One (seed, category) pair on the same test images: labels, the baseline's and the arm's scores, all in the
    order of ``paths``."""

    paths: tuple[str, ...]
    labels: np.ndarray
    base: np.ndarray
    arm: np.ndarray


@lru_cache(maxsize=256)
def _read(path: str, mtime: float, excluded: tuple[tuple[str, str], ...]) -> dict[str, dict[str, tuple[int, float]]]:
    by_category: dict[str, dict[str, tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            label = int(row["label"])
            if label in (0, 1) and (row["category"], row.get("defect_type", "")) not in excluded:
                by_category.setdefault(row["category"], {})[row["path"]] = (label, float(row["image_score"]))
    return by_category


@lru_cache(maxsize=256)
def _excluded_types(results: str, mtime: float) -> tuple[tuple[str, str], ...]:
    """(category, defect type) pairs a run kept out of its main metrics (results.json's
    ``excluded_from_main_metrics``, e.g. ELPV's uncertain cells), so a recomputed AUROC leaves them out too; read
    once per file version, as scores.csv is."""
    try:
        categories = json.loads(Path(results).read_text()).get("categories", {})
        return tuple(sorted((category, defect) for category, entry in categories.items()
                            for defect in (entry.get("excluded_from_main_metrics") or {})))
    except (OSError, ValueError, AttributeError):
        return ()


def image_scores(run_dir: str | Path, category: str) -> dict[str, tuple[int, float]] | None:
    """path -> (label, image score) of one category of a run's scores.csv, the images of the main metrics only;
    None without one (older runs)."""
    path = Path(run_dir) / "scores.csv"
    if not path.is_file():
        return None
    try:
        results = Path(run_dir) / "results.json"
        excluded = _excluded_types(str(results), results.stat().st_mtime) if results.is_file() else ()
        return _read(str(path), path.stat().st_mtime, excluded).get(category)
    except (OSError, KeyError, ValueError):
        return None


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image AUROC by the Mann-Whitney U of the average ranks (ties count 1/2), as sklearn's roc_auc_score."""
    positive = labels == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def wins(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """P[i, j] = 1 when defect j scores above nominal i, 1/2 on a tie, else 0 ([n0, n1])."""
    nominal, defect = scores[labels == 0], scores[labels == 1]
    return (defect[None, :] > nominal[:, None]) + 0.5 * (defect[None, :] == nominal[:, None])


def draw_counts(rng: np.random.Generator, labels: np.ndarray, replicates: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each nominal and each defective image is drawn in each replicate ([B, n0], [B, n1]): the
    nominal images drawn first (``rng.integers(0, n0, (B, n0))``), then the defective ones."""
    counts = []
    for n in (int((labels == 0).sum()), int((labels == 1).sum())):
        picks = rng.integers(0, n, size=(replicates, n))
        offsets = picks + n * np.arange(replicates)[:, None]
        counts.append(np.bincount(offsets.ravel(), minlength=n * replicates).reshape(replicates, n).astype(float))
    return counts[0], counts[1]


def replicate_differences(pair: Paired, counts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """AUROC(arm) - AUROC(baseline) on each replicate's images ([B]), in AUROC units."""
    c0, c1 = counts
    delta = wins(pair.labels, pair.arm) - wins(pair.labels, pair.base)
    return ((c0 @ delta) * c1).sum(axis=1) / (c0.shape[1] * c1.shape[1])


def bootstrap(pairs: dict[str, list[Paired]], replicates: int = REPLICATES, seed: int = RNG_SEED) -> dict:
    """The paired bootstrap of the image-AUROC difference (arm - baseline, percentage points).

    ``pairs``: category -> one ``Paired`` per seed position, the same number of seed positions in every category
    (position k is the same seed everywhere). Draw order, for a reproducible check: for each category in sorted
    order, for each distinct test set in order of first appearance, ``draw_counts``; then the seeds,
    ``rng.integers(0, S, (B, S))``. Returns mean, low, high (the 2.5 / 97.5 % percentiles of the replicates),
    per category the same, the spread over seeds (sample std of the per-seed pooled differences) and the
    replicates themselves."""
    rng = np.random.default_rng(seed)
    categories = sorted(pairs)
    n_seeds = len(pairs[categories[0]])
    if any(len(pairs[c]) != n_seeds for c in categories):
        raise ValueError("every category needs the same seed positions")
    per_seed = {}  # category -> [B, S]: each seed's difference on each replicate's images
    for category in categories:
        columns, drawn = np.empty((replicates, n_seeds)), {}
        for k, pair in enumerate(pairs[category]):
            if pair.paths not in drawn:
                drawn[pair.paths] = draw_counts(rng, pair.labels, replicates)
            columns[:, k] = replicate_differences(pair, drawn[pair.paths])
        per_seed[category] = columns
    picks = rng.integers(0, n_seeds, size=(replicates, n_seeds))
    rows = np.arange(replicates)[:, None]
    by_category = {c: 100 * per_seed[c][rows, picks].mean(axis=1) for c in categories}
    pooled = np.mean([by_category[c] for c in categories], axis=0)
    observed = {c: 100 * np.mean([auroc(p.labels, p.arm) - auroc(p.labels, p.base) for p in pairs[c]])
                for c in categories}
    seed_pooled = [100 * np.mean([auroc(pairs[c][k].labels, pairs[c][k].arm) - auroc(pairs[c][k].labels,
                                                                                      pairs[c][k].base)
                                  for c in categories]) for k in range(n_seeds)]
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(pooled, [tail, 100 - tail])
    return {"mean": float(np.mean(list(observed.values()))), "low": float(low), "high": float(high),
            "categories": {c: {"mean": float(observed[c]),
                               **dict(zip(("low", "high"), map(float, np.percentile(by_category[c],
                                                                                    [tail, 100 - tail])))),
                               "images": len(pairs[c][0].paths)} for c in categories},
            "seed_sd": float(np.std(seed_pooled, ddof=1)) if n_seeds > 1 else float("nan"),
            "n_seeds": n_seeds, "replicates": pooled}


def delong(labels: np.ndarray, base: np.ndarray, arm: np.ndarray) -> dict:
    """DeLong's test for two correlated AUROCs on the same images (fast form, Sun & Xu 2014): each AUROC, the
    difference arm - baseline (AUROC units), its normal 95 % interval and the two-sided p-value."""
    labels = np.asarray(labels)
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    scores = np.stack([np.asarray(base, float), np.asarray(arm, float)])
    x, y = scores[:, positive], scores[:, ~positive]
    tx, ty = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    tz = stats.rankdata(np.concatenate([x, y], axis=1), axis=1)
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    v01 = (tz[:, :m] - tx) / n          # structural components of the defective images
    v10 = 1 - (tz[:, m:] - ty) / m      # of the nominal images
    covariance = np.cov(v01) / m + np.cov(v10) / n
    contrast = np.array([-1.0, 1.0])
    sd = float(np.sqrt(contrast @ covariance @ contrast))
    diff = float(aucs[1] - aucs[0])
    z = stats.norm.ppf(1 - (1 - LEVEL) / 2)
    p = float(2 * stats.norm.sf(abs(diff) / sd)) if sd > 0 else (1.0 if diff == 0 else 0.0)
    return {"auroc_base": float(aucs[0]), "auroc_arm": float(aucs[1]), "diff": diff, "sd": sd,
            "low": float(diff - z * sd), "high": float(diff + z * sd), "p": p}
