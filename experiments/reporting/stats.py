"""The report's statistics, in one place so every table states the same thing: a cell is the mean over
seeds ± the sample standard deviation over seeds (ddof=1; one seed: no spread), and a difference between
two arms is paired by (seed, category) with a Student-t 95% interval. The paper's tables, the run digest and
experiments/finetune_compare.py all call these.

Pairs from one category are not independent draws, so the interval is a guide to the spread, not a test over
a population of datasets.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from experiments.reporting.data import seed_means

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


def signed(value: float) -> str:
    return f"{value:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0")


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


def paired(base: pd.DataFrame, arm: pd.DataFrame, metric: str, categories: list[str]) -> dict | None:
    """The paired difference of ``metric`` (arm - baseline rows, percentage points) with a 95% t interval; by
    category against the baseline's mean over seeds when they share no seed (a deterministic arm run once)."""
    def table(rows: pd.DataFrame) -> pd.Series:
        rows = rows[rows["category"].isin(categories)].dropna(subset=[metric])
        return rows.groupby(["seed", "category"])[metric].mean() * 100

    a, b = table(arm), table(base)
    common = a.index.intersection(b.index)
    if len(common):
        diffs, pairing = (a[common] - b[common]).to_numpy(), "(seed, category)"
    else:
        a_cat, b_cat = a.groupby(level="category").mean(), b.groupby(level="category").mean()
        shared = a_cat.index.intersection(b_cat.index)
        if not len(shared):
            return None
        diffs, pairing = (a_cat[shared] - b_cat[shared]).to_numpy(), "category (baseline: mean over seeds)"
    mean, std, n = mean_std(diffs)
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if std > 0 else 0.0
    else:
        half = math.nan
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "pairing": pairing}


def verdict(diff: dict) -> str:
    """How the paper words a difference: only an interval that excludes zero is called a change."""
    if math.isnan(diff["low"]):
        return "one pair only: no interval"
    if diff["low"] > 0:
        return "higher"
    if diff["high"] < 0:
        return "lower"
    return "no clear difference"
