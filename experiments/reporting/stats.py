"""The report's statistics, in one place so every table states the same thing: a cell is the mean over
seeds ± the sample standard deviation over seeds (ddof=1; one seed: no spread), and a difference between two
arms (``paired``) is the mean over categories of arm - baseline in percentage points with a 95 % interval:

- image AUROC, where both arms' scores.csv reproduce their results.json: the paired bootstrap over test images
  and seeds (intervals.py says why and how);
- otherwise (pixel AUROC and AU-PRO, which have no per-image scores; runs without scores.csv): seed level, the
  test images held fixed: a Student-t interval over the per-seed differences of the mean over categories (seeds
  are the independent units; (seed, category) pairs share images and are never counted as independent).

The ``pairing`` field of each difference says which, and every caption and sentence prints it. ``verdict`` words
a difference by its interval alone; ``signed`` prints a bound with as many decimals as keep its side of 0 and of
±EQUIVALENCE. The paper's tables, the run digest and experiments/finetune_compare.py all call these.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from experiments.reporting.data import seed_means
from experiments.reporting.intervals import AGREEMENT, REPLICATES, Paired, auroc, bootstrap, image_scores
from experiments.reporting.wording import plural

SPREAD = "mean ± sample std over seeds (ddof=1)"  # the convention, as each table's caption states it


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std or nan, n) of the non-missing values."""
    array = np.asarray(pd.Series(values, dtype=float).dropna())
    if not len(array):
        return math.nan, math.nan, 0
    return float(np.mean(array)), float(np.std(array, ddof=1)) if len(array) > 1 else math.nan, len(array)


def number(mean: float, std: float, n: int, digits: int = 1) -> str:
    """``mean ± std`` with ``digits`` decimals (``mean`` alone for one seed, ``-`` for none)."""
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 and not math.isnan(std) else f"{mean:.{digits}f}"


# A difference whose interval lies inside ±EQUIVALENCE points is called equivalent: half a point is below what
# one test set resolves (one image of 50 nominal x 100 defective moves the AUROC by up to 1 to 2 points) and below
# the differences a setting is chosen for.
EQUIVALENCE = 0.5
EQUIVALENT = f"equivalent within ±{EQUIVALENCE:g} points"
VERDICTS = ("higher", "lower", EQUIVALENT, "not resolved")


# Differences closer than this to 0 or ±EQUIVALENCE (in points) are on that edge: averaging leaves float noise
# (100 * (0.9 - 0.905) is -0.5000000000000004), which must neither tip a verdict nor demand 15 decimals.
TOLERANCE = 1e-9


def side(value: float, edge: float) -> int:
    """-1, 0 or +1: below, on (within TOLERANCE) or above ``edge``."""
    return 0 if abs(value - edge) <= TOLERANCE else (1 if value > edge else -1)


def signed(value: float, digits: int = 1) -> str:
    """A difference with its sign and at least ``digits`` decimals, more where rounding would move it onto or
    across 0 or ±EQUIVALENCE (a bound of +0.004 never prints as +0.0 beside "higher")."""
    if value is None or math.isnan(value):
        return "-"
    if side(value, 0) == 0:
        return f"{0:.{digits}f}"
    for decimals in range(digits, 10):
        text = f"{value:+.{decimals}f}"
        if all(side(float(text), edge) == side(value, edge) for edge in (0, EQUIVALENCE, -EQUIVALENCE)):
            return text
    return f"{value:+.2e}"


def interval(diff: dict) -> str:
    """``mean [low, high]`` of a difference (the mean alone without an interval)."""
    if math.isnan(diff["low"]):
        return signed(diff["mean"])
    return f"{signed(diff['mean'])} [{signed(diff['low'])}, {signed(diff['high'])}]"


def sources_of(rows: pd.DataFrame) -> list[str]:
    return sorted({str(Path(d) / "results.json") for d in rows["run_dir"]})


def cell_stats(rows: pd.DataFrame, metric: str, category: str | None, categories: list[str]) -> tuple:
    """(mean, sample std or nan, n seeds, the results.json files) in percent for one category, or for the
    mean over ``categories`` (each seed's mean first) when ``category`` is None."""
    if category is None:
        values = [100 * v for v in seed_means(rows, metric, categories)]
        used = rows[rows["category"].isin(categories)]
    else:
        used = rows[rows["category"] == category]
        values = (used[metric].dropna() * 100).tolist()
    return (*mean_std(values), sources_of(used))


BOOTSTRAPPED = ("image_auroc",)  # the metrics scores.csv holds the per-image scores of
BOOTSTRAP_WORDS = (f"paired bootstrap over the test images (nominal and defective resampled separately, matched by "
                   f"path) and the seeds, {REPLICATES} replicates")


def seed_words(why: str) -> str:
    return f"seed level, test images held fixed ({why}): Student t over the per-seed differences"


def _table(rows: pd.DataFrame, column: str, categories: list[str]) -> dict:
    """(seed, category) -> ``column`` of the rows with ``metric`` known."""
    return {(row.seed, row.category): getattr(row, column) for row in rows.itertuples()
            if row.category in categories}


def _positions(base: dict, arm: dict, categories: list[str]) -> tuple[list[str], list[tuple], str] | None:
    """(the categories both arms have, [(arm seed, baseline seed)], the pairing in words), or None: seeds pair
    with the same seed, so an arm run on fewer seeds than the baseline (one seed, to save time) meets the baseline
    at its own seeds: the shared seed's coreset and subsets cancel, which a comparison with the baseline's mean over
    seeds would add as noise (a squared-distance arm, image AUROC identical by construction, then showed +0.8
    points). Only an arm run once at a seed the baseline lacks pairs with every baseline seed."""
    shared = [c for c in categories if any(k[1] == c for k in base) and any(k[1] == c for k in arm)]
    if not shared:
        return None

    def seeds(table: dict) -> list:
        return sorted({s for s, _ in table if all((s, c) in table for c in shared)}, key=str)

    base_seeds, arm_seeds = seeds(base), seeds(arm)
    common = [s for s in arm_seeds if s in base_seeds]
    if len(arm_seeds) == 1 and not common and len(base_seeds) > 1:
        return shared, [(arm_seeds[0], s) for s in base_seeds], \
            f"the arm's one run against each of {len(base_seeds)} baseline seeds"
    return (shared, [(s, s) for s in common], f"same seed, {plural(len(common), 'seed')}") if common else None


def _image_pairs(base: pd.DataFrame, arm: pd.DataFrame, categories: list[str]) -> tuple[dict | None, str]:
    """(category -> one intervals.Paired per seed position, the pairing) or (None, why the images cannot be
    paired): both arms' scores.csv, the same test images (by path), and AUROCs equal to results.json's."""
    tables = [_table(rows.dropna(subset=["image_auroc"]), "run_dir", categories) for rows in (base, arm)]
    aurocs = [_table(rows.dropna(subset=["image_auroc"]), "image_auroc", categories) for rows in (base, arm)]
    found = _positions(*tables, categories)
    if found is None:
        return None, "no shared seed or category"
    shared, positions, pairing = found
    pairs: dict[str, list[Paired]] = {}
    for category in shared:
        for arm_seed, base_seed in positions:
            keys = ((base_seed, category), (arm_seed, category))
            scores = [image_scores(tables[i][key], category) for i, key in enumerate(keys)]
            if any(s is None for s in scores):
                return None, "no scores.csv"
            if set(scores[0]) != set(scores[1]):
                return None, "the arms' scores.csv hold different test images"
            paths = tuple(sorted(scores[0]))
            labels = np.array([scores[0][p][0] for p in paths])
            if labels.min() == labels.max() or any(scores[1][p][0] != scores[0][p][0] for p in paths):
                return None, "scores.csv without both classes or with differing labels"
            pair = Paired(paths, labels, *(np.array([s[p][1] for p in paths]) for s in scores))
            if any(abs(auroc(labels, values) - aurocs[i][key]) > AGREEMENT
                   for i, (values, key) in enumerate(zip((pair.base, pair.arm), keys))):
                return None, "scores.csv does not reproduce results.json's image AUROC"
            pairs.setdefault(category, []).append(pair)
    return pairs, pairing


def _seed_level(base: pd.DataFrame, arm: pd.DataFrame, metric: str, categories: list[str], why: str) -> dict | None:
    """Per seed position, the mean over categories of arm - baseline; a t interval over those (test images
    held fixed)."""
    tables = [_table(rows.dropna(subset=[metric]), metric, categories) for rows in (base, arm)]
    found = _positions(*tables, categories)
    if found is None:
        return None
    shared, positions, pairing = found
    diffs = [100 * np.mean([tables[1][(a, c)] - tables[0][(b, c)] for c in shared]) for a, b in positions]
    mean, std, n = mean_std(diffs)
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 and std > 0 else (0.0 if n > 1 else
                                                                                              math.nan)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "seed_sd": std,
            "categories": {}, "method": "seed", "how": seed_words(why), "pairing": f"{seed_words(why)}; {pairing}"}


def paired(base: pd.DataFrame, arm: pd.DataFrame, metric: str, categories: list[str]) -> dict | None:
    """The difference of ``metric`` (arm - baseline rows, percentage points, mean over the categories both arms
    have) with its 95 % interval: the paired bootstrap over test images and seeds for image AUROC where the
    scores allow, else seed level (module docstring). Keys: mean, low, high, n (seed positions), seed_sd,
    categories (per category mean, low, high, images; bootstrap only), method ("bootstrap" | "seed"), how (the
    interval in words, as captions print it), pairing (with the counts and the seed pairing, as sentences print
    it). None when the arms share no category (or seed)."""
    why = "no per-image scores for this metric"
    if metric in BOOTSTRAPPED:
        pairs, said = _image_pairs(base, arm, categories)
        if pairs is None:
            why = said
        else:
            result = bootstrap(pairs)
            images = sum(entry["images"] for entry in result["categories"].values())
            return {**{k: v for k, v in result.items() if k != "replicates"}, "n": result["n_seeds"],
                    "method": "bootstrap", "how": BOOTSTRAP_WORDS,
                    "pairing": f"paired bootstrap over {images} test images (nominal and defective resampled "
                               f"separately) and {plural(result['n_seeds'], 'seed')}, {REPLICATES} replicates; {said}"}
    return _seed_level(base, arm, metric, categories, why)


def verdict(diff: dict) -> str:
    """How a difference is worded, from its 95 % interval alone: "higher" / "lower" when it excludes 0,
    EQUIVALENT when it lies inside ±EQUIVALENCE points, else "not resolved" (also without an interval); a bound
    within TOLERANCE of an edge is on it, as ``signed`` prints it."""
    low, high = diff["low"], diff["high"]
    if math.isnan(low) or math.isnan(high):
        return "not resolved"
    if side(low, 0) > 0:
        return "higher"
    if side(high, 0) < 0:
        return "lower"
    if side(low, -EQUIVALENCE) >= 0 and side(high, EQUIVALENCE) <= 0:
        return EQUIVALENT
    return "not resolved"
