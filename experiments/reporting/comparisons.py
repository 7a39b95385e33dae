"""Comparisons: which runs are compared with which, and the statistics the paper states about them.

A comparison is a baseline arm and the arms measured against it. From a study (``study.json``, written by
experiments/study.py) the arms are the study's, and the arms that could not run (no weights, a failed or
unfinished job) are kept with the reason. For other runs the comparisons are inferred from the report's
variants (experiments/reporting/variants.py): the baseline is the most common backbone's variant without
deviations, and each other variant joins the comparison its deviating settings belong to.

Paired differences: an arm minus the baseline on the same (seed, category), over every pair both have (when
they share no seed, e.g. a deterministic arm run once: per category, against the baseline's mean over seeds);
the 95% confidence interval is Student's t over those pairs. Pairs from one category are not independent
draws, so the interval is a guide to the spread, not a test over a population of datasets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.reporting.data import Run, seed_means
from extensions.checkpoint import is_finetuned

BASELINE = "baseline"
GROUPS = {  # an inferred comparison of the variants whose first deviating setting is one of these
    "coreset._target_": "baselines", "model._target_": "baselines",
    "patchcore.aggregation": "variants", "patchcore.distance": "variants", "patchcore.image_score": "variants",
    "patchcore.top_percent": "variants", "dataset.train_limit": "cold_start",
}
TITLES = {"extractors": "Feature extractors", "finetuning": "Fine-tuned backbones",
          "baselines": "Memory-bank and model baselines", "variants": "Variants of the algorithm",
          "cold_start": "Cold start (few nominal images)"}


@dataclass
class Arm:
    name: str
    rows: pd.DataFrame            # the tidy rows (data.tidy) of its runs
    runs: list[Run]

    @property
    def seeds(self) -> list:
        return sorted(self.rows["seed"].dropna().unique().tolist())


@dataclass
class Comparison:
    name: str
    title: str
    arms: list[Arm]                                       # the baseline first
    missing: list[tuple[str, str]] = field(default_factory=list)  # (arm, why it is not in the comparison)
    sweep: str | None = None                              # the swept setting of a sweep

    @property
    def baseline(self) -> Arm:
        return self.arms[0]

    @property
    def others(self) -> list[Arm]:
        return self.arms[1:]


def _resolved(path: str | Path) -> str:
    return str(Path(path).resolve())


def from_manifest(manifest: dict, runs: list[Run], frame: pd.DataFrame) -> list[Comparison]:
    """The study's comparisons over the runs the report includes (missing arms kept with the reason)."""
    by_folder = {_resolved(run.folder): run for run in runs}
    jobs = {row["id"]: row for row in manifest.get("jobs", [])}
    specs = (manifest.get("config") or {}).get("comparisons") or {}
    comparisons = []
    for name, entry in (manifest.get("comparisons") or {}).items():
        members: dict[str, list[Run]] = {}
        problems: dict[str, list[str]] = {}
        for job_id in entry.get("jobs", []):
            job = jobs.get(job_id)
            if job is None or job["kind"] != "patchcore":
                continue
            run = by_folder.get(_resolved(job["folder"]))
            if run is None:
                why = job.get("status", "not run")
                why = {"pending": "not run yet", "running": "interrupted"}.get(why, why)
                problems.setdefault(job["arm"], []).append(f"seed {job['seed']}: {why}")
            else:
                members.setdefault(job["arm"], []).append(run)
        arms = []
        for arm in entry.get("arms", []):
            if arm in members:
                folders = {str(run.folder) for run in members[arm]}
                arms.append(Arm(arm, frame[frame["run_dir"].isin(folders)], members[arm]))
        missing = [(arm, "; ".join(why)) for arm, why in problems.items()]
        missing += [(row["arm"], row["reason"]) for row in manifest.get("skipped", []) if row["comparison"] == name]
        if not arms or arms[0].name != BASELINE:
            missing.insert(0, (BASELINE, "the baseline has no complete run"))
            arms = []
        spec = specs.get(name) or {}
        comparisons.append(Comparison(name, entry.get("title", name), arms, missing,
                                      spec.get("sweep") if isinstance(spec, dict) else None))
    return comparisons


def infer(runs: list[Run], frame: pd.DataFrame) -> list[Comparison]:
    """Comparisons of runs not made by a study, from their variant labels."""
    if not runs:
        return []
    counts = pd.Series([run.backbone for run in runs]).value_counts()
    main = counts.index[0]
    plain = [run for run in runs if run.backbone == main and not run.deviations]
    if not plain:
        return []
    base_variant = plain[0].variant
    groups: dict[str, dict[str, list[Run]]] = {}
    sweeps: dict[str, str] = {}
    for run in runs:
        if run.variant == base_variant:
            continue
        if run.backbone != main:
            name = "finetuning" if is_finetuned(run.config.get("backbone") or {}) else "extractors"
            if run.deviations:
                name = "other"
        else:
            first = sorted(run.deviations)[0]
            name = GROUPS.get(first) if len(run.deviations) == 1 else "other"
            if name is None:
                name = first.rsplit(".", 1)[-1]
                sweeps[name] = first
        groups.setdefault(name, {}).setdefault(run.variant, []).append(run)
    base_runs = [run for run in runs if run.variant == base_variant]

    def arm(label: str, members: list[Run]) -> Arm:
        return Arm(label, frame[frame["variant"] == members[0].variant], members)

    return [Comparison(name, TITLES.get(name, f"Sweep of {sweeps.get(name, name)}"),
                       [arm(BASELINE, base_runs), *(arm(v, members) for v, members in sorted(variants.items()))],
                       sweep=sweeps.get(name) or ("dataset.train_limit" if name == "cold_start" else None))
            for name, variants in groups.items()]


# ----------------------------------------------------------------------------------------------- statistics


def categories_of(comparison: Comparison) -> list[str]:
    return sorted(set().union(*(set(arm.rows["category"]) for arm in comparison.arms)))


def cell_stats(rows: pd.DataFrame, metric: str, category: str | None, categories: list[str]) -> tuple:
    """(mean, sample std or nan, n seeds, the results.json files) in percent for one category, or for the
    mean over ``categories`` (each seed's mean first) when ``category`` is None."""
    if category is None:
        values = [100 * v for v in seed_means(rows, metric, categories)]
        used = rows[rows["category"].isin(categories)]
    else:
        used = rows[rows["category"] == category]
        values = (used[metric].dropna() * 100).tolist()
    sources = sorted({str(Path(d) / "results.json") for d in used["run_dir"]})
    if not values:
        return math.nan, math.nan, 0, sources
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std, len(values), sources


def paired(base: Arm, arm: Arm, metric: str, categories: list[str]) -> dict | None:
    """The paired difference of ``metric`` (arm - baseline, percentage points) with a 95% t interval."""
    from scipy import stats

    def table(rows: pd.DataFrame) -> pd.Series:
        rows = rows[rows["category"].isin(categories)].dropna(subset=[metric])
        return rows.groupby(["seed", "category"])[metric].mean() * 100

    a, b = table(arm.rows), table(base.rows)
    common = a.index.intersection(b.index)
    if len(common):
        diffs, pairing = (a[common] - b[common]).to_numpy(), "(seed, category)"
    else:
        a_cat, b_cat = a.groupby(level="category").mean(), b.groupby(level="category").mean()
        shared = a_cat.index.intersection(b_cat.index)
        if not len(shared):
            return None
        diffs, pairing = (a_cat[shared] - b_cat[shared]).to_numpy(), "category (baseline: mean over seeds)"
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n > 1 and np.std(diffs, ddof=1) > 0:
        half = float(stats.t.ppf(0.975, n - 1) * np.std(diffs, ddof=1) / math.sqrt(n))
    else:
        half = 0.0 if n > 1 else math.nan
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
