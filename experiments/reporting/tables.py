"""Every table of the report as a document-model ``TableBlock`` whose cells carry the number behind them,
its sample std over seeds and the results.json files it comes from: the paper's per comparison (summary,
per category, paired differences, the main table, the fine-tuning selection) and the run digest's
(category x variant per metric, time and memory). Each is also written as CSV (the numbers; ``_std.csv``
the spreads), Markdown and LaTeX (booktabs). Statistics: stats.py (one convention, stated in each caption).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from core.io import write_text_atomic
from experiments.harness.results import METRIC_TITLES
from experiments.reporting.comparisons import Comparison, categories_of
from experiments.reporting.data import first_run, read_log, read_overrides, read_sidecar, sidecars
from experiments.reporting.document import Cell, TableBlock
from experiments.reporting.markdown_out import table as markdown_table
from experiments.reporting.stats import (
    BOOTSTRAP_WORDS,
    EQUIVALENT,
    SPREAD,
    cell_stats,
    interval,
    number,
    paired,
    sources_of,
    verdict,
)
from experiments.reporting.wording import plural

SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
PAIRED_METRICS = ("image_auroc", "pixel_auroc", "aupro")
TABLE_METRICS = SUMMARY_METRICS  # the digest's metric tables, in order
MEAN_ROW = "mean"


def stat_cell(mean: float, std: float, n: int, sources: list[str], digits: int = 1) -> Cell:
    """A ``mean ± std`` cell (stats.number) with the numbers behind it."""
    return Cell(number(mean, std, n, digits), None if math.isnan(mean) else mean, std=std, sources=sources)


def _bold_best(cells: list[Cell], lower: bool = False) -> None:
    """Bold the best printed value among ``cells`` (ties all bold) when two or more have one."""
    shown = [(cell, round(cell.value, 1)) for cell in cells if cell.value is not None and not math.isnan(cell.value)]
    if len(shown) < 2:
        return
    best = min(v for _, v in shown) if lower else max(v for _, v in shown)
    for cell, value in shown:
        cell.bold = value == best


def _bold_columns(rows: list[list[Cell]], columns: range) -> None:
    for j in columns:
        _bold_best([row[j] for row in rows])


def _count(n: int) -> Cell:
    return Cell(str(n), float(n))


def _plain(x: float, digits: int, sources: list[str]) -> Cell:
    """A number without a spread (a time, a size)."""
    return Cell("-") if math.isnan(x) else Cell(f"{x:.{digits}f}", float(x), sources=sources)


def _by_category(groups: list[tuple[str, pd.DataFrame]], metric: str, categories: list[str]) -> list[list[Cell]]:
    """Per group (an arm, a variant): its cell of ``metric`` in each category, then of the mean over them."""
    return [[stat_cell(*cell_stats(rows, metric, category, categories)) for category in [*categories, None]]
            for _, rows in groups]


def _means(arm, metrics: tuple[str, ...], categories: list[str]) -> list[Cell]:
    return [stat_cell(*cell_stats(arm.rows, metric, None, categories)) for metric in metrics]


# ------------------------------------------------------------------------------------------- the paper


def summary_table(comparison: Comparison) -> TableBlock:
    """Arms x (each metric's mean over categories, mean ± std over seeds; fit time per category, fine-tuning
    included, and the fine-tuning's part)."""
    categories = categories_of(comparison)
    header = ["arm", "seeds", *(METRIC_TITLES[m] for m in SUMMARY_METRICS), "fit s / category",
              "of which fine-tuning"]
    rows = [[Cell(arm.name), _count(len(arm.seeds)), *_means(arm, SUMMARY_METRICS, categories),
             _plain(arm.rows["fit_s"].mean(), 1, sources_of(arm.rows)),
             _plain(arm.rows["finetune_s"].fillna(0).mean(), 1, sources_of(arm.rows))] for arm in comparison.arms]
    _bold_columns(rows, range(2, 2 + len(SUMMARY_METRICS)))
    return TableBlock(f"{comparison.name}_summary", f"{comparison.title}: mean over the "
                      f"{plural(len(categories), 'category')} (%, {SPREAD}; best in bold) and fit time per category "
                      "(feature extraction + coreset, or a model's training, plus a fine-tuned backbone's fine-tuning "
                      "on that category: its training and proxy evaluations).", header, rows)


def category_table(comparison: Comparison, metric: str) -> TableBlock:
    """Arms x (categories + mean) of one metric."""
    categories = categories_of(comparison)
    cells = _by_category([(arm.name, arm.rows) for arm in comparison.arms], metric, categories)
    rows = [[Cell(arm.name), *row] for arm, row in zip(comparison.arms, cells)]
    _bold_columns(rows, range(1, len(categories) + 2))
    return TableBlock(f"{comparison.name}_{metric}", f"{comparison.title}: {METRIC_TITLES[metric]} per category "
                      f"(%, {SPREAD}; best per column in bold).", ["arm", *categories, "mean"], rows)


def paired_rows(comparison: Comparison) -> list[tuple[str, str, dict | None]]:
    """(arm, metric, its paired difference to the baseline: stats.paired) per arm and PAIRED_METRICS; computed once
    per comparison (the bootstrap is seeded, so a second computation would give the same numbers)."""
    if comparison.paired_cache is None:
        categories = categories_of(comparison)
        comparison.paired_cache = [(arm.name, metric, paired(comparison.baseline.rows, arm.rows, metric, categories))
                                   for arm in comparison.others for metric in PAIRED_METRICS]
    return comparison.paired_cache


def intervals_caption(diffs: list[tuple[str, dict]]) -> str:
    """How the intervals of ``(metric, difference)`` were made (stats.paired's ``how``), each way once with the
    metrics it was used for."""
    ways: dict[str, list[str]] = {}
    for metric, diff in diffs:
        if diff is not None and METRIC_TITLES[metric] not in ways.setdefault(diff["how"], []):
            ways[diff["how"]].append(METRIC_TITLES[metric])
    return "; ".join(f"{' and '.join(titles)}: {how}" for how, titles in ways.items())


VERDICT_RULE = (f"verdict from the Image AUROC interval: higher / lower when it excludes 0, {EQUIVALENT} when it "
                "lies inside that band, else not resolved")


def paired_table(comparison: Comparison) -> TableBlock | None:
    """Arms x (the difference against the baseline of each metric with its 95% interval, the image-AUROC verdict,
    the seeds paired)."""
    found, n, rows = paired_rows(comparison), len(PAIRED_METRICS), []
    diffs = [diff for _, _, diff in found]
    for i, arm in enumerate(comparison.others):
        sources = sorted({*sources_of(comparison.baseline.rows), *sources_of(arm.rows)})
        own = dict(zip(PAIRED_METRICS, diffs[i * n:(i + 1) * n]))
        cells = [Cell("-") if d is None else Cell(interval(d), d["mean"], sources=sources) for d in own.values()]
        image = own["image_auroc"]
        rows.append([Cell(arm.name), *cells, Cell("-" if image is None else verdict(image)),
                     _count(max((d["n"] for d in own.values() if d is not None), default=0))])
    if not rows:
        return None
    header = ["arm", *(f"Δ {METRIC_TITLES[m]}" for m in PAIRED_METRICS), "verdict", "seeds"]
    return TableBlock(f"{comparison.name}_paired", f"{comparison.title}: difference to the baseline (arm - baseline, "
                      f"percentage points, mean over categories) [95% interval]. Intervals: "
                      f"{intervals_caption([(m, d) for _, m, d in found])}. {VERDICT_RULE[0].upper()}"
                      f"{VERDICT_RULE[1:]}. Seeds: the arm's seed with the same baseline seed (an arm run once "
                      "at a seed the baseline lacks: with each baseline seed).", header, rows)


def category_paired_table(comparison: Comparison) -> TableBlock | None:
    """Arms x categories: the image-AUROC difference per category with its bootstrap interval (where it holds the
    per-image scores); None when no arm has one."""
    categories, rows = categories_of(comparison), []
    for arm in comparison.others:
        diff = paired(comparison.baseline.rows, arm.rows, "image_auroc", categories)
        if diff is None or not diff["categories"]:
            continue
        sources = sorted({*sources_of(comparison.baseline.rows), *sources_of(arm.rows)})
        cells = [Cell(interval(diff["categories"][c]), diff["categories"][c]["mean"], sources=sources)
                 if c in diff["categories"] else Cell("-") for c in categories]
        rows.append([Cell(arm.name), *cells])
    if not rows:
        return None
    return TableBlock(f"{comparison.name}_paired_categories", f"{comparison.title}: Image AUROC difference to the "
                      f"baseline per category (percentage points) [95% interval: {BOOTSTRAP_WORDS}].",
                      ["arm", *categories], rows)


def main_table(comparisons: list[Comparison]) -> TableBlock | None:
    """Every arm of every comparison once (the baseline first): the report's main table, also logged to W&B."""
    rows: dict[tuple, list[Cell]] = {}  # each dataset's baseline once
    several = len({comparison.dataset for comparison in comparisons}) > 1
    for comparison in comparisons:
        if comparison.selection is not None:
            continue  # its candidates are the selection's own tables (the choice, the oracle, the agreement)
        for arm in comparison.arms:
            key, label = ((comparison.dataset, arm.name), f"{arm.name} ({comparison.dataset})" if several
                          else arm.name) if arm is comparison.baseline else \
                ((comparison.name, arm.name), f"{comparison.title}: {arm.name}")
            rows.setdefault(key, [Cell(label), *_means(arm, PAIRED_METRICS, categories_of(comparison)),
                                  _count(len(arm.seeds))])
    if not rows:
        return None
    _bold_columns(list(rows.values()), range(1, 1 + len(PAIRED_METRICS)))
    header = ["arm", *(METRIC_TITLES[m] for m in PAIRED_METRICS), "seeds"]
    over = "its dataset's" if several else "the"
    return TableBlock("main", f"Every arm of the study but the selection's candidates (their own tables): mean "
                      f"over {over} categories (%, {SPREAD}; best in bold).",
                      header, list(rows.values()))


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def selection_table(comparison: Comparison) -> TableBlock | None:
    """Per fine-tuned arm and category (first seed): selected step of the steps run, proxy score and effective
    rank at step 0 and at the selected step, the weights' relative change at the selected step, collapse warnings
    (from the checkpoints' sidecars, docs/finetuning.md).
    None when no checkpoint has a selection record."""
    rows = []
    for arm in comparison.others:
        for category, path in sidecars(first_run(arm.runs)):
            record = read_sidecar(path)
            if record is None:
                continue
            selection, source = record["selection"], [str(path)]
            start, chosen, monitors = selection.get("start") or {}, selection.get("proxy") or {}, \
                selection.get("monitors") or {}
            numbers = [(start.get("score"), 3), (chosen.get("score"), 3), (start.get("effective_rank"), 1),
                       (monitors.get("effective_rank"), 1), (monitors.get("weight_distance_rel"), 4)]
            rows.append([Cell(f"{arm.name} / {category}"), Cell(f"{record.get('selected_step')} of "
                                                                f"{record.get('steps')}", record.get("selected_step"),
                                                                sources=source),
                         *(Cell(_number(value, digits), value, sources=source) for value, digits in numbers),
                         _count(len(selection.get("collapse_warnings") or []))])
    if not rows:
        return None
    header = ["arm / category", "selected step", "proxy at 0", "proxy selected", "eff. rank at 0",
              "eff. rank selected", "||w-w0|| / ||w0|| selected", "collapse warnings"]
    return TableBlock(f"{comparison.name}_selection", f"{comparison.title}: the checkpoint the proxy selected "
                      "(first seed; from each checkpoint's sidecar JSON, docs/finetuning.md).", header, rows)


def sweep_table(sweeps: list[Path]) -> TableBlock:
    """One row per finished sidecar of the jobs of fine-tuning sweeps (``<job>/checkpoints/<method>/<base>/``), in
    job order: the job's ``method.*`` overrides, the selected step's proxy scores and collapse monitors, and the
    last evaluation's (what training gave without the selection, from the proxy log)."""
    rows = []
    jobs = [(sweep, path) for sweep in sweeps for path in sorted(sweep.glob("*/checkpoints/*/*/*.json"))]
    for sweep, path in jobs:
        record, job = read_sidecar(path), path.parents[3]
        if record is None:
            continue
        selection = record["selection"]
        chosen, start, monitors = selection["proxy"], selection["start"], selection["monitors"]
        last = (read_log(path.parent / selection.get("proxy_log", f"{record['category']}.proxy.jsonl")) or [{}])[-1]
        settings = [o.removeprefix("method.") for o in read_overrides(job) or [] if o.startswith("method.")]
        ranks = (monitors.get("effective_rank"), start.get("effective_rank"), last.get("effective_rank"))
        rows.append([Cell(text) for text in (
            sweep.name, record["method"], record["category"], ", ".join(settings) or "defaults",
            f"{record['selected_step']}/{record['steps']}", _number(chosen["image_auroc"], 4),
            _number(chosen["pixel_auroc"], 4), f"{_number(chosen['score'], 4)} ({_number(start.get('score'), 4)})",
            _number(last.get("score"), 4), " / ".join(_number(rank, 0) for rank in ranks),
            _number(monitors.get("weight_distance_rel"), 4),
            ", ".join(map(str, selection.get("collapse_warnings") or [])) or "-")])
    header = ["sweep", "method", "category", "settings", "selected / run steps", "proxy image AUROC",
              "proxy pixel AUROC", "proxy score (step 0)", "last step's proxy score",
              "effective rank, selected / step 0 / last", "||w-w0|| / ||w0||", "collapse warnings at"]
    return TableBlock("finetune_sweep", "Fine-tuning sweeps: each job's selected checkpoint (proxy scores and "
                      "collapse monitors) and its last evaluation.", header, rows)


# ------------------------------------------------------------------------------------------- the digest


def metric_table(frame: pd.DataFrame, metric: str, variants: list[str]) -> TableBlock:
    """Categories (+ the mean row) x variants of ``metric`` in percent; the mean row averages each seed's
    categories first and stays empty for a variant lacking one of them, so no mean hides a missing category."""
    categories = sorted(frame["category"].unique())
    columns = _by_category([(v, frame[frame["variant"] == v]) for v in variants], metric, categories)
    rows = [[Cell(category or MEAN_ROW), *(column[i] for column in columns)]
            for i, category in enumerate([*categories, None])]
    for row in rows:
        _bold_best(row[1:])
    return TableBlock(metric, f"{METRIC_TITLES[metric]} in % per category and variant ({SPREAD}); best per row in "
                      "bold.", ["category", *variants], rows, rule_before=len(categories))


TIMING_COLUMNS = ("categories", "seeds", "fit s / category", "coreset s / category", "test images / s",
                  "bank size", "peak RSS MB")
DIGITS = (0, 0, 1, 1, 1, 0, 0)  # TIMING_COLUMNS' decimals


def timing_table(frame: pd.DataFrame, variants: list[str]) -> TableBlock:
    """Per variant: fit and coreset time per category, inference throughput, memory-bank size (means over
    categories and seeds) and the largest of the runs' peak resident memory."""
    rows = []
    for variant in variants:
        used = frame[frame["variant"] == variant]
        predict = used["predict_s"].sum()
        numbers = [used["category"].nunique(), used["seed"].nunique(), used["fit_s"].mean(), used["coreset_s"].mean(),
                   used["n_test"].sum() / predict if predict > 0 else np.nan, used["bank_size"].mean(),
                   used["peak_rss_mb"].max()]
        rows.append([Cell(variant), *(_plain(x, digits, sources_of(used)) for x, digits in zip(numbers, DIGITS))])
    return TableBlock("timing", "Time and memory: seconds, means over categories and seeds; fit = feature extraction "
                      "+ coreset selection (a model's training), plus a fine-tuned backbone's fine-tuning; "
                      "throughput = test images / prediction time; peak RSS = the largest of the "
                      "runs' peak resident memory.", ["variant", *TIMING_COLUMNS], rows)


# ------------------------------------------------------------------------------------------- files


def frames(block: TableBlock) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(the numbers, their stds or None when no cell has one) as row label x column."""
    def grid(attribute: str) -> pd.DataFrame:
        values = [[np.nan if getattr(c, attribute) is None else getattr(c, attribute) for c in row[1:]]
                  for row in block.rows]
        return pd.DataFrame(values, index=[row[0].text for row in block.rows], columns=block.header[1:],
                            dtype=float).rename_axis(block.header[0])

    std = grid("std")
    return grid("value"), (None if std.isna().all().all() else std)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text)).replace("±", r"$\pm$")


def to_latex(block: TableBlock) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    def cell(c: Cell) -> str:
        return rf"\textbf{{{latex_escape(c.text)}}}" if c.bold else latex_escape(c.text)

    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(block.header) - 1) + "}", r"\toprule",
             " & ".join(map(latex_escape, block.header)) + r" \\", r"\midrule"]
    for i, row in enumerate(block.rows):
        if block.rule_before is not None and i == block.rule_before:
            lines.append(r"\midrule")
        lines.append(" & ".join(map(cell, row)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(block.caption)}}}",
              rf"\label{{tab:{block.name}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(blocks: list, folder: Path, prefix: str = "") -> list[TableBlock]:
    """Every table among a document's ``blocks``, written to ``folder``: ``<prefix><name>.csv`` (the numbers;
    ``_std.csv`` their spreads), ``.md`` and ``.tex``."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = [block for block in blocks if isinstance(block, TableBlock)]
    for block in tables:
        stem, (values, std) = f"{prefix}{block.name}", frames(block)
        write_text_atomic(folder / f"{stem}.csv", values.to_csv())
        if std is not None:
            write_text_atomic(folder / f"{stem}_std.csv", std.to_csv())
        write_text_atomic(folder / f"{stem}.md", markdown_table(block))
        write_text_atomic(folder / f"{stem}.tex", to_latex(block))
    return tables


def sources_rows(blocks: list[TableBlock]) -> list[dict]:
    """One row per table cell with a number: where it comes from (tables/sources.csv, paper.json)."""
    return [{"table": block.name, "row": row[0].text, "column": column, "text": cell.text, "value": cell.value,
             "sources": cell.sources}
            for block in blocks for row in block.rows for column, cell in zip(block.header, row)
            if cell.value is not None and cell.sources]
