"""The ``selection`` comparison's numbers and tables (experiments/studies/selection_kind.py; docs/selection.md,
"How far it can be trusted"): per category the label-free choice, the defaults (the baseline) and the oracle
(test set), with paired intervals, and the Spearman rank correlation between proxy score and test image AUROC.

- The choice: per seed and category, the test rows of the candidate run that this seed's selection.json chose
  for that category. Its rows are assembled from several runs, one per (seed, category), and stats.paired pairs
  them with the baseline's as it pairs any arm (it looks a run up per (seed, category); intervals.py resamples
  each pair's test images), so the choice gets the same bootstrap, intervals and verdicts as every arm.
- The oracle (test set): per category, the candidate with the highest mean test image AUROC over its runs (the
  mean the tables print), among those that ran the selection's seeds (a baseline with more seeds competes with
  its mean over all of them; ties: the earlier candidate, the base first). It reads the test labels: it bounds
  what any choice within this space could reach and is no method; it is named "oracle (test set)" wherever it
  appears.
- Spearman: per seed and category, between the candidates' proxy scores (that seed's selection.json) and their
  test image AUROCs at that seed (their results.json); averaged over seeds, each seed shown, and over categories.
  With fewer than MIN_CANDIDATES candidates, or a constant score or AUROC, there is no rank correlation ("-").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from experiments.harness.selection_file import read_selection
from experiments.reporting.comparisons import Comparison, categories_of
from experiments.reporting.document import Cell, TableBlock
from experiments.reporting.stats import SPREAD, cell_stats, interval, paired, sources_of, verdict
from experiments.reporting.tables import VERDICT_RULE, stat_cell
from experiments.reporting.wording import breakable

CHOICE = "label-free choice"
DEFAULTS = "defaults"
ORACLE = "oracle (test set)"
MIN_CANDIDATES = 3  # two candidates always rank +-1: no information
MEAN_ROW = "mean"
EMPTY = pd.DataFrame(columns=["seed", "category", "image_auroc"])


@dataclass
class SelectionNumbers:
    """What the tables and sentences of one selection comparison say."""

    comparison: Comparison
    categories: list[str]
    chosen: dict[tuple[int, str], str]          # (seed, category) -> the chosen candidate's arm
    choice: pd.DataFrame                        # the choice's tidy rows, one run per (seed, category)
    oracle: dict[str, str]                      # category -> the oracle's arm
    oracle_rows: pd.DataFrame
    choice_diff: dict | None                    # stats.paired: choice - defaults, image AUROC
    oracle_diff: dict | None                    # oracle (test set) - defaults
    spearman: dict[str, dict[int, float]]       # category -> seed -> rho (nan: no correlation)
    counts: dict[str, dict[int, int]]           # category -> seed -> candidates correlated
    files: list[str] = field(default_factory=list)   # the selection.json files read
    notes: list[str] = field(default_factory=list)   # what could not be used, and why


def _rows(rows: pd.DataFrame, seed, category: str) -> pd.DataFrame:
    return rows[(rows["seed"] == seed) & (rows["category"] == category)]


def _score_pairs(node: dict, candidates: dict[str, str], arms: dict[str, pd.DataFrame], seed,
                 category: str) -> list[tuple[float, float]]:
    """(proxy score, test image AUROC) of each candidate of one selection.json category that has both."""
    pairs = []
    for entry in node.get("candidates", []):
        score, arm = entry.get("score"), candidates.get(entry["name"], entry["name"])
        test = _rows(arms[arm], seed, category)["image_auroc"].dropna() if arm in arms else EMPTY
        if score is not None and math.isfinite(score) and len(test):
            pairs.append((float(score), float(test.iloc[0])))
    return pairs


def rank_correlation(scores: list[float], aurocs: list[float]) -> float:
    """Spearman's rho of proxy scores against test AUROCs; nan without enough candidates or with a constant."""
    if len(scores) < MIN_CANDIDATES or len(set(scores)) < 2 or len(set(aurocs)) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(scores, aurocs)[0])


def selection_numbers(comparison: Comparison) -> SelectionNumbers | None:
    """The numbers of a selection comparison (None for any other comparison, or without a baseline)."""
    if comparison.selection is None or not comparison.arms:
        return None
    candidates = comparison.selection.get("candidates") or {}
    arms = {arm.name: arm.rows for arm in comparison.arms}
    categories, notes, files = categories_of(comparison), [], []
    records = {}
    for seed, path in sorted((comparison.selection.get("files") or {}).items()):
        try:
            records[seed] = read_selection(path)
            files.append(str(path))
        except ValueError as error:
            notes.append(f"seed {seed}: {error}")
    chosen, pieces, spearman, counts = {}, [], {}, {}
    for seed, record in records.items():
        for category in categories:
            node = (record.get("categories") or {}).get(category)
            if node is None:
                notes.append(f"seed {seed}, {category}: not in {comparison.selection['files'][seed]}")
                continue
            arm = candidates.get(node["chosen"], node["chosen"])
            rows = _rows(arms[arm], seed, category) if arm in arms else EMPTY
            if rows.empty:
                notes.append(f"seed {seed}, {category}: the chosen candidate {arm} has no test run")
            else:
                chosen[seed, category] = arm
                pieces.append(rows)
            pairs = _score_pairs(node, candidates, arms, seed, category)
            spearman.setdefault(category, {})[seed] = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs])
            counts.setdefault(category, {})[seed] = len(pairs)
    choice = pd.concat(pieces) if pieces else comparison.baseline.rows.iloc[0:0]
    # a candidate runs the selection's seeds; the baseline may have run more (a study whose selection comparison
    # has one seed): every arm that ran the selection's seeds competes, each with its mean over its own runs, the
    # mean the tables print (requiring the baseline's seeds would leave the baseline as the only candidate)
    seeds = set(records)
    oracle, oracle_pieces = {}, []
    for category in categories:
        means = {arm.name: arm.rows.loc[arm.rows["category"] == category, "image_auroc"].mean()
                 for arm in comparison.arms if set(arm.rows.loc[arm.rows["category"] == category, "seed"]) >= seeds}
        means = {name: mean for name, mean in means.items() if not math.isnan(mean)}
        if means:
            oracle[category] = max(means, key=means.get)  # max keeps the first of equal means: the base first
            rows = arms[oracle[category]]
            oracle_pieces.append(rows[rows["category"] == category])
    oracle_rows = pd.concat(oracle_pieces) if oracle_pieces else comparison.baseline.rows.iloc[0:0]
    base = comparison.baseline.rows
    return SelectionNumbers(comparison, categories, chosen, choice, oracle, oracle_rows,
                            paired(base, choice, "image_auroc", categories) if len(choice) else None,
                            paired(base, oracle_rows, "image_auroc", categories) if len(oracle_rows) else None,
                            spearman, counts, files, notes)


def _stat(rows: pd.DataFrame, category: str | None, categories: list[str]) -> Cell:
    return stat_cell(*cell_stats(rows, "image_auroc", category, categories))


def _rho(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.2f}"


def _seed_means(spearman: dict[str, dict[int, float]]) -> dict[int, float]:
    """Per seed, the mean over categories of rho (the categories with one)."""
    seeds = sorted({seed for by_seed in spearman.values() for seed in by_seed})
    values = {seed: [by_seed[seed] for by_seed in spearman.values() if not math.isnan(by_seed.get(seed, math.nan))]
              for seed in seeds}
    return {seed: float(np.mean(v)) if v else math.nan for seed, v in values.items()}


def mean_rho(by_seed: dict[int, float]) -> float:
    """The mean over seeds of the rhos that exist (nan when none does)."""
    values = [v for v in by_seed.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def category_rho(found: SelectionNumbers, category: str | None = None) -> float:
    """A category's Spearman rho (its mean over seeds); without a category the mean over the categories that
    have one (nan when none has)."""
    if category is not None:
        return mean_rho(found.spearman.get(category, {}))
    means = [m for m in (mean_rho(found.spearman.get(c, {})) for c in found.categories) if not math.isnan(m)]
    return float(np.mean(means)) if means else math.nan


def choice_table(found: SelectionNumbers) -> TableBlock:
    """Per category (+ the mean): the test image AUROC of the defaults, the label-free choice and the oracle (test
    set), and which candidates they were."""
    c, cats = found.comparison, found.categories
    rows = []
    for category in [*cats, None]:
        picks = "; ".join(f"{seed}: {breakable(arm)}" for (seed, cat), arm in sorted(found.chosen.items())
                          if cat == category)
        rows.append([Cell(category or MEAN_ROW), _stat(c.baseline.rows, category, cats),
                     _stat(found.choice, category, cats), _stat(found.oracle_rows, category, cats),
                     Cell(picks or "-"), Cell(breakable(found.oracle.get(category, "-")) if category else "-")])
    return TableBlock(f"{c.name}_choice", f"{c.title}: Image AUROC of the {DEFAULTS} (the baseline), the "
                      f"{CHOICE} (per seed, the candidate that seed's selection.json chose "
                      "from training images only) "
                      f"and the {ORACLE}, per category the candidate with the best mean test Image AUROC (it uses "
                      f"the test labels: a bound, not a method); %, {SPREAD}.",
                      ["category", DEFAULTS, CHOICE, ORACLE, "chosen (seed: candidate)", f"{ORACLE}: candidate"],
                      rows, rule_before=len(cats))


def paired_selection_table(found: SelectionNumbers) -> TableBlock | None:
    """Per category (+ the pooled mean): choice - defaults and oracle - defaults with their intervals and verdicts
    (stats.paired, as every comparison's)."""
    diffs = (found.choice_diff, found.oracle_diff)
    if not any(diffs):
        return None
    sources = sorted({*sources_of(found.comparison.baseline.rows), *sources_of(found.choice),
                      *sources_of(found.oracle_rows)})

    def cells(diff: dict | None) -> list[Cell]:
        if diff is None:
            return [Cell("-"), Cell("-")]
        return [Cell(interval(diff), diff["mean"], sources=sources), Cell(verdict(diff))]

    rows = [[Cell(category), *(c for diff in diffs for c in cells((diff or {}).get("categories", {}).get(category)))]
            for category in found.categories]
    rows.append([Cell(f"{MEAN_ROW} (pooled)"), *(c for diff in diffs for c in cells(diff))])
    how = "; ".join(dict.fromkeys(diff["pairing"] for diff in diffs if diff))
    return TableBlock(f"{found.comparison.name}_choice_paired", f"{found.comparison.title}: Image AUROC "
                      f"difference to the {DEFAULTS} (percentage points) [95% interval]: {how}. "
                      f"{VERDICT_RULE[0].upper()}{VERDICT_RULE[1:]}. The {ORACLE} uses the test labels.",
                      ["category", f"Δ {CHOICE}", "verdict (choice)", f"Δ {ORACLE}", "verdict (oracle)"], rows,
                      rule_before=len(found.categories))


def spearman_table(found: SelectionNumbers) -> TableBlock:
    """Per category (+ the mean over categories): Spearman's rho between proxy score and test image AUROC over
    the candidates, the mean over seeds and each seed's."""
    sources = [*found.files, *sources_of(pd.concat([arm.rows for arm in found.comparison.arms]))]
    rows = []
    for category in found.categories:
        by_seed = found.spearman.get(category, {})
        mean = mean_rho(by_seed)
        rows.append([Cell(category), Cell(_rho(mean), None if math.isnan(mean) else mean, sources=sources),
                     Cell(", ".join(f"{seed}: {_rho(v)}" for seed, v in sorted(by_seed.items())) or "-"),
                     Cell(", ".join(str(n) for _, n in sorted(found.counts.get(category, {}).items())) or "-")])
    seeds, pooled = _seed_means(found.spearman), category_rho(found)
    rows.append([Cell(f"{MEAN_ROW} over categories"),
                 Cell(_rho(pooled), None if math.isnan(pooled) else pooled, sources=sources),
                 Cell(", ".join(f"{seed}: {_rho(v)}" for seed, v in sorted(seeds.items())) or "-"), Cell("")])
    return TableBlock(f"{found.comparison.name}_spearman", f"{found.comparison.title}: Spearman rank "
                      "correlation between the proxy score (selection.json, training images only) and the test Image "
                      "AUROC (results.json) over the candidates of each category, per seed and their mean (- : fewer "
                      f"than {MIN_CANDIDATES} candidates or a constant); the last row averages the categories.",
                      ["category", "Spearman ρ (mean over seeds)", "per seed", "candidates per seed"], rows,
                      rule_before=len(found.categories))


def selection_tables(found: SelectionNumbers) -> list[TableBlock]:
    return [t for t in (choice_table(found), paired_selection_table(found), spearman_table(found)) if t is not None]


def spearman_sentence(found: SelectionNumbers) -> str:
    """The rank agreement in words: the mean over categories and each category's mean over seeds."""
    means = {category: category_rho(found, category) for category in found.categories}
    shown = {c: m for c, m in means.items() if not math.isnan(m)}
    if not shown:
        return "The proxy's rank correlation with the test Image AUROC could not be computed (too few candidates)."
    return (f"Over the candidates, the proxy score and the test Image AUROC have a Spearman rank correlation of "
            f"{category_rho(found):+.2f} on average over categories and seeds (per category: "
            + ", ".join(f"{c} {m:+.2f}" for c, m in shown.items()) + ").")

