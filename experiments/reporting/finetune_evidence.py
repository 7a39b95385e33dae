"""What fine-tuning did, read from the checkpoints' sidecars beside the test results: per training length, how far
the weights moved and how the features' effective rank changed (the training-length curve), and whether the
label-free proxy that selected each checkpoint agrees with the test set (docs/finetuning.md).

The agreement is measured on gains, not levels: per fine-tuned arm and category, the proxy's gain (its score at
the selected step minus at step 0) against the test's gain (the arm's test image AUROC minus the baseline's, same
seed and category), each averaged over seeds. Levels would mostly correlate category difficulty (a category easy
for the proxy is easy for the test too), which says nothing about choosing a checkpoint. A fine-tuning shared by
two comparisons (the curve's default-length point is the finetuning comparison's run) counts once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from experiments.reporting.comparisons import Comparison
from experiments.reporting.data import read_log, read_sidecar, sidecars
from experiments.reporting.document import Cell, TableBlock


@dataclass(frozen=True)
class TunedPoint:
    """One fine-tuned checkpoint (arm, category, seed) with its selection record and its test result."""

    dataset: str | None
    comparison: str
    arm: str
    category: str
    seed: int | None
    checkpoint: str                   # the sidecar's path: the same fine-tuning seen by two comparisons
    steps: int | None                 # steps run
    selected_step: int | None
    proxy_start: float | None         # proxy score at step 0 (the pretrained weights)
    proxy_selected: float | None
    weight_change: float | None       # ||w - w0|| / ||w0|| at the selected step
    weight_change_last: float | None  # ... at the last evaluation (what training did, before selection)
    rank_start: float | None          # effective rank of the proxy bank's features at step 0
    rank_selected: float | None
    rank_last: float | None
    accuracy: float | None            # the task's training accuracy at the end (rotation), and its chance level
    chance: float | None
    test: float | None                # test image AUROC (fraction) of the arm's run, and of the baseline's
    test_baseline: float | None


def _by_seed_category(rows) -> dict[tuple, float]:
    return {(seed, category): value for seed, category, value in
            zip(rows["seed"], rows["category"], rows["image_auroc"]) if value == value}


def tuned_points(comparison: Comparison) -> list[TunedPoint]:
    """Every finished sidecar of the comparison's fine-tuned arms, with the test results of its seed."""
    baseline = _by_seed_category(comparison.baseline.rows) if not comparison.baseline.rows.empty else {}
    points = []
    for arm in comparison.others:
        tests = _by_seed_category(arm.rows) if not arm.rows.empty else {}
        for run in arm.runs:
            seed = run.config.get("seed")
            for category, path in sidecars(run):
                record = read_sidecar(path)
                if record is None:
                    continue
                selection = record["selection"]
                start, chosen = selection.get("start") or {}, selection.get("proxy") or {}
                monitors = selection.get("monitors") or {}
                log = read_log(Path(path).parent / selection.get("proxy_log", f"{category}.proxy.jsonl"))
                last = log[-1] if log else {}
                points.append(TunedPoint(
                    comparison.dataset, comparison.name, arm.name, category, seed, str(path), record.get("steps"),
                    record.get("selected_step"), start.get("score"), chosen.get("score"),
                    monitors.get("weight_distance_rel"), last.get("weight_distance_rel"), start.get("effective_rank"),
                    monitors.get("effective_rank"), last.get("effective_rank"), record.get("final_accuracy_mean"),
                    record.get("chance_accuracy"), tests.get((seed, category)), baseline.get((seed, category))))
    return points


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _text(value: float | None, digits: int, scale: float = 1.0, sign: bool = False) -> str:
    return "-" if value is None else f"{value * scale:{'+' if sign else ''}.{digits}f}"


@dataclass(frozen=True)
class Unit:
    """A fine-tuned arm on one category, its gains averaged over the seeds it ran."""

    dataset: str | None
    arm: str
    category: str
    seeds: int
    proxy_gain: float
    test_gain: float    # image AUROC points
    kept_start: bool    # the proxy kept step 0 (the pretrained weights) in every seed


def units(points: list[TunedPoint]) -> list[Unit]:
    """Per (dataset, arm, category): the mean proxy and test gains over seeds; a checkpoint seen twice counts once."""
    seen, groups = set(), {}
    for point in points:
        if point.checkpoint in seen or None in (point.proxy_start, point.proxy_selected, point.test,
                                                point.test_baseline):
            continue
        seen.add(point.checkpoint)
        groups.setdefault((point.dataset, point.comparison, point.arm, point.category), []).append(point)
    return [Unit(dataset, arm, category, len(group),
                 float(np.mean([p.proxy_selected - p.proxy_start for p in group])),
                 float(np.mean([(p.test - p.test_baseline) * 100 for p in group])),
                 all(p.selected_step == 0 for p in group))
            for (dataset, _, arm, category), group in groups.items()]


def sign(value: float, tolerance: float = 1e-9) -> int:
    """-1, 0 or 1; changes below ``tolerance`` (rounding of the recorded AUROCs) are no change."""
    return int(value > tolerance) - int(value < -tolerance)


def same_sign(pairs: list[tuple[float, float]]) -> int:
    """How many (proxy change, test change) pairs agree in sign, no change on both sides counting as agreeing
    (the proxy kept the pretrained weights and the test saw the baseline's result): the one rule for sign
    agreement (experiments/finetune_compare.py prints this module's agreement table)."""
    return sum(sign(proxy) == sign(test) for proxy, test in pairs)


def agreement(found: list[Unit]) -> dict:
    """Spearman's rho between proxy and test gains over the units (None with fewer than 3 or a constant side),
    sign agreement over all units, and how many kept step 0 in every seed."""
    proxy, test = np.array([u.proxy_gain for u in found]), np.array([u.test_gain for u in found])
    rho = p_value = None
    if len(found) >= 3 and np.ptp(proxy) > 0 and np.ptp(test) > 0:
        result = spearmanr(proxy, test)
        rho, p_value = float(result.statistic), float(result.pvalue)
    return {"n": len(found), "spearman": rho, "p_value": p_value,
            "same_sign": same_sign([(u.proxy_gain, u.test_gain) for u in found]),
            "kept_start": sum(u.kept_start for u in found)}


def agreement_table(comparisons: list[Comparison]) -> TableBlock | None:
    """Per dataset and pooled: does the proxy's gain rank fine-tuned checkpoints as the test does?"""
    found = units([point for comparison in comparisons for point in tuned_points(comparison)])
    if not found:
        return None
    datasets = sorted({u.dataset or "" for u in found})
    groups = [(d, [u for u in found if (u.dataset or "") == d]) for d in datasets]
    groups += [("all", found)] if len(datasets) > 1 else []
    rows = []
    for name, group in groups:
        stats = agreement(group)
        rows.append([Cell(name or "-"), Cell(str(stats["n"]), stats["n"]),
                     Cell(_text(stats["spearman"], 2), stats["spearman"]), Cell(_text(stats["p_value"], 3),
                                                                                stats["p_value"]),
                     Cell(f"{stats['same_sign']} of {stats['n']}", stats["same_sign"]),
                     Cell(str(stats["kept_start"]), stats["kept_start"])])
    header = ["dataset", "arms x categories", "Spearman rho (proxy gain, test gain)", "p", "same sign",
              "proxy kept step 0"]
    return TableBlock("proxy_agreement", "Does the label-free proxy agree with the test set? Per fine-tuned arm and "
                      "category (gains over step 0 and over the baseline, means over seeds): Spearman's rank "
                      "correlation, and how often the two gains have the same sign (no change on both sides "
                      "agrees).",
                      header, rows)


def units_table(comparisons: list[Comparison]) -> TableBlock | None:
    """The agreement's points: each arm and category's proxy gain and test gain."""
    found = units([point for comparison in comparisons for point in tuned_points(comparison)])
    if not found:
        return None
    rows = [[Cell(f"{u.dataset} / {u.arm} / {u.category}"), Cell(str(u.seeds), u.seeds),
             Cell(_text(u.proxy_gain, 4, sign=True), u.proxy_gain), Cell(_text(u.test_gain, 2, sign=True), u.test_gain),
             Cell("yes" if u.kept_start else "no")] for u in found]
    return TableBlock("proxy_agreement_points", "The points of the agreement: proxy gain (score at the selected step "
                      "minus at step 0) and test gain (image AUROC points over the baseline), means over seeds.",
                      ["dataset / arm / category", "seeds", "proxy gain", "test gain", "kept step 0 always"], rows)


def curve_table(comparison: Comparison) -> TableBlock | None:
    """The training-length curve's monitors per step count and category, means over seeds: steps run, the
    selected steps, the weights' relative change and the effective rank at the selected and the last evaluation,
    the task's final training accuracy against chance, the test gain."""
    if not comparison.points:
        return None
    points = tuned_points(comparison)
    rows = []
    order = sorted({(comparison.points.get(p.arm, ("", 0))[0], comparison.points.get(p.arm, ("", 0))[1], p.arm,
                     p.category) for p in points})
    for series, steps, arm, category in order:
        group = [p for p in points if p.arm == arm and p.category == category]
        mean = {key: _mean([getattr(p, key) for p in group]) for key in (
            "weight_change", "weight_change_last", "rank_start", "rank_selected", "rank_last", "accuracy", "chance")}
        gain = _mean([(p.test - p.test_baseline) * 100 for p in group if None not in (p.test, p.test_baseline)])
        ranks = " / ".join(_text(mean[key], 0) for key in ("rank_start", "rank_selected", "rank_last"))
        rows.append([
            Cell(f"{series} / {category}"), Cell(str(steps), steps),
            Cell("/".join(str(p.selected_step) for p in group)),
            Cell(_text(mean["weight_change"], 4), mean["weight_change"]),
            Cell(_text(mean["weight_change_last"], 4), mean["weight_change_last"]), Cell(ranks),
            Cell("-" if mean["accuracy"] is None else f"{mean['accuracy']:.2f} ({_text(mean['chance'], 2)})"),
            Cell(_text(gain, 2, sign=True), gain), Cell(str(len(group)), len(group))])
    if not rows:
        return None
    header = ["method / category", "steps", "selected step per seed", "||w-w0|| / ||w0|| selected",
              "||w-w0|| / ||w0|| last", "effective rank step 0 / selected / last", "train accuracy (chance)",
              "test gain (image AUROC points)", "seeds"]
    return TableBlock(f"{comparison.name}_monitors", f"{comparison.title}: what each training length did to the "
                      "weights and features (means over seeds; from the checkpoints' sidecars and proxy logs).",
                      header, rows)
