"""Every table of the report as a document-model ``TableBlock`` whose cells carry the number behind them,
its sample std over seeds and the results.json files it comes from: the paper's per comparison (summary,
per category, paired differences, the main table, the fine-tuning selection) and the run digest's
(category x variant per metric, time and memory). Each is also written as CSV (the numbers; ``_std.csv``
the spreads), Markdown and LaTeX (booktabs). Statistics: stats.py (one convention, stated in each caption).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from core.io import write_text_atomic
from experiments.harness.results import METRIC_TITLES
from experiments.reporting.comparisons import Comparison, categories_of
from experiments.reporting.document import Cell, TableBlock
from experiments.reporting.markdown_out import table as markdown_table
from experiments.reporting.stats import SPREAD, cell_stats, number, paired, signed, sources_of

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


# ------------------------------------------------------------------------------------------- the paper


def summary_table(comparison: Comparison) -> TableBlock:
    """Arms x (each metric's mean over categories, mean ± std over seeds; fit time per category)."""
    categories = categories_of(comparison)
    header = ["arm", "seeds", *(METRIC_TITLES[m] for m in SUMMARY_METRICS), "fit s / category"]
    rows = []
    for arm in comparison.arms:
        row = [Cell(arm.name), Cell(str(len(arm.seeds)), float(len(arm.seeds)))]
        row += [stat_cell(*cell_stats(arm.rows, metric, None, categories)) for metric in SUMMARY_METRICS]
        fit = arm.rows["fit_s"].mean()
        row.append(Cell("-" if math.isnan(fit) else f"{fit:.1f}", None if math.isnan(fit) else float(fit),
                        sources=sources_of(arm.rows)))
        rows.append(row)
    _bold_columns(rows, range(2, 2 + len(SUMMARY_METRICS)))
    return TableBlock(f"{comparison.name}_summary", f"{comparison.title}: mean over the {len(categories)} categories "
                      f"(%, {SPREAD}; best in bold) and fit time.", header, rows)


def category_table(comparison: Comparison, metric: str) -> TableBlock:
    """Arms x (categories + mean) of one metric."""
    categories = categories_of(comparison)
    rows = [[Cell(arm.name), *(stat_cell(*cell_stats(arm.rows, metric, category, categories))
                               for category in [*categories, None])] for arm in comparison.arms]
    _bold_columns(rows, range(1, len(categories) + 2))
    return TableBlock(f"{comparison.name}_{metric}", f"{comparison.title}: {METRIC_TITLES[metric]} per category "
                      f"(%, {SPREAD}; best per column in bold).", ["arm", *categories, "mean"], rows)


def paired_rows(comparison: Comparison) -> list[tuple[str, str, dict | None]]:
    categories = categories_of(comparison)
    return [(arm.name, metric, paired(comparison.baseline.rows, arm.rows, metric, categories))
            for arm in comparison.others for metric in PAIRED_METRICS]


def paired_table(comparison: Comparison) -> TableBlock | None:
    """Arms x (the paired difference against the baseline of each metric, with its 95% interval)."""
    base_sources = sources_of(comparison.baseline.rows)
    rows = []
    by_arm: dict[str, list] = {}
    for name, _, diff in paired_rows(comparison):
        by_arm.setdefault(name, []).append(diff)
    for arm in comparison.others:
        sources = sorted({*base_sources, *sources_of(arm.rows)})
        row = [Cell(arm.name)]
        for diff in by_arm[arm.name]:
            interval = "" if diff is None or math.isnan(diff["low"]) else \
                f" [{signed(diff['low'])}, {signed(diff['high'])}]"
            row.append(Cell("-") if diff is None else Cell(f"{signed(diff['mean'])}{interval}", diff["mean"],
                                                           sources=sources))
        pairs = max((diff["n"] for diff in by_arm[arm.name] if diff is not None), default=0)
        rows.append([*row, Cell(str(pairs), float(pairs))])
    if not rows:
        return None
    header = ["arm", *(f"Δ {METRIC_TITLES[m]}" for m in PAIRED_METRICS), "pairs"]
    return TableBlock(f"{comparison.name}_paired", f"{comparison.title}: difference to the baseline in percentage "
                      "points, paired by seed and category, [95% interval].", header, rows)


def main_table(comparisons: list[Comparison]) -> TableBlock | None:
    """Every arm of every comparison once (the baseline first): the report's main table, also logged to W&B."""
    rows, seen = [], set()
    for comparison in comparisons:
        categories = categories_of(comparison)
        for arm in comparison.arms:
            key = (arm.name if arm is comparison.baseline else f"{comparison.name}/{arm.name}")
            if key in seen:
                continue
            seen.add(key)
            row = [Cell(arm.name if arm is comparison.baseline else f"{comparison.title}: {arm.name}")]
            row += [stat_cell(*cell_stats(arm.rows, metric, None, categories)) for metric in PAIRED_METRICS]
            rows.append([*row, Cell(str(len(arm.seeds)), float(len(arm.seeds)))])
    if not rows:
        return None
    _bold_columns(rows, range(1, 1 + len(PAIRED_METRICS)))
    header = ["arm", *(METRIC_TITLES[m] for m in PAIRED_METRICS), "seeds"]
    return TableBlock("main", f"Every arm of the study: mean over categories (%, {SPREAD}; best in bold).",
                      header, rows)


def _sidecar_cell(value, sidecar: Path, digits: int = 3) -> Cell:
    return Cell("-" if value is None else f"{value:.{digits}f}", value, sources=[str(sidecar)])


def selection_row(name: str, sidecar: Path) -> list[Cell] | None:
    """The checkpoint the proxy selected, from a fine-tuning sidecar (docs/finetuning.md); None without one."""
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    selection = record.get("selection") or {}
    if not selection:
        return None
    start, chosen = selection.get("start") or {}, selection.get("proxy") or {}
    monitors = selection.get("monitors") or {}
    return [Cell(name), Cell(f"{record.get('selected_step')} of {record.get('steps')}", record.get("selected_step"),
                             sources=[str(sidecar)]),
            _sidecar_cell(start.get("score"), sidecar), _sidecar_cell(chosen.get("score"), sidecar),
            _sidecar_cell(start.get("effective_rank"), sidecar, 1),
            _sidecar_cell(monitors.get("effective_rank"), sidecar, 1),
            Cell(str(len(selection.get("collapse_warnings") or [])))]


def selection_table(comparison: Comparison) -> TableBlock | None:
    """Per fine-tuned arm and category (first seed): selected step of the steps run, proxy score and effective
    rank at step 0 and at the selected step, collapse warnings. None when no checkpoint has a selection record."""
    rows = []
    for arm in comparison.others:
        run = min(arm.runs, key=lambda r: (str(r.config.get("seed")), str(r.folder)))
        checkpoint = (run.config.get("backbone") or {}).get("checkpoint")
        for category in sorted(run.results.get("categories") or {}) if checkpoint else []:
            row = selection_row(f"{arm.name} / {category}", Path(str(checkpoint)).parent / f"{category}.json")
            rows += [row] if row else []
    if not rows:
        return None
    header = ["arm / category", "selected step", "proxy at 0", "proxy selected", "eff. rank at 0",
              "eff. rank selected", "collapse warnings"]
    return TableBlock(f"{comparison.name}_selection", f"{comparison.title}: the checkpoint the proxy selected "
                      "(first seed; from each checkpoint's sidecar JSON, docs/finetuning.md).", header, rows)


# ------------------------------------------------------------------------------------------- the digest


def metric_table(frame: pd.DataFrame, metric: str, variants: list[str]) -> TableBlock:
    """Categories (+ the mean row) x variants of ``metric`` in percent; the mean row averages each seed's
    categories first and stays empty for a variant lacking one of them, so no mean hides a missing category."""
    categories = sorted(frame["category"].unique())
    by_variant = {variant: frame[frame["variant"] == variant] for variant in variants}
    rows = []
    for category in [*categories, None]:
        row = [stat_cell(*cell_stats(by_variant[v], metric, category, categories)) for v in variants]
        _bold_best(row)
        rows.append([Cell(category or MEAN_ROW), *row])
    title = METRIC_TITLES[metric]
    return TableBlock(metric, f"{title} in % per category and variant ({SPREAD}); best per row in bold.",
                      ["category", *variants], rows, rule_before=len(categories))


TIMING_COLUMNS = ("categories", "seeds", "fit s / category", "coreset s / category", "test images / s",
                  "bank size", "peak RSS MB")


def timing_table(frame: pd.DataFrame, variants: list[str]) -> TableBlock:
    """Per variant: fit and coreset time per category, inference throughput, memory-bank size (means over
    categories and seeds) and the largest of the runs' peak resident memory."""
    formats = ("{:.0f}", "{:.0f}", "{:.1f}", "{:.1f}", "{:.1f}", "{:.0f}", "{:.0f}")
    rows = []
    for variant in variants:
        used = frame[frame["variant"] == variant]
        predict = used["predict_s"].sum()
        numbers = [used["category"].nunique(), used["seed"].nunique(), used["fit_s"].mean(), used["coreset_s"].mean(),
                   used["n_test"].sum() / predict if predict > 0 else np.nan, used["bank_size"].mean(),
                   used["peak_rss_mb"].max()]
        sources = sources_of(used)
        rows.append([Cell(variant), *(Cell("-") if math.isnan(x) else Cell(f.format(x), float(x), sources=sources)
                                      for x, f in zip(numbers, formats))])
    return TableBlock("timing", "Time and memory: seconds, means over categories and seeds; fit = feature extraction "
                      "+ coreset selection; throughput = test images / prediction time; peak RSS = the largest of the "
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


def write_table(block: TableBlock, folder: Path, stem: str | None = None) -> list[Path]:
    """``<stem>.csv`` (the numbers; ``<stem>_std.csv`` their spreads), ``.md`` and ``.tex``."""
    stem = stem or block.name
    values, std = frames(block)
    written = [write_text_atomic(folder / f"{stem}.csv", values.to_csv())]
    if std is not None:
        written.append(write_text_atomic(folder / f"{stem}_std.csv", std.to_csv()))
    written.append(write_text_atomic(folder / f"{stem}.md", markdown_table(block)))
    written.append(write_text_atomic(folder / f"{stem}.tex", to_latex(block)))
    return written


def sources_rows(blocks: list[TableBlock]) -> list[dict]:
    """One row per table cell with a number: where it comes from (tables/sources.csv, paper.json)."""
    return [{"table": block.name, "row": row[0].text, "column": column, "text": cell.text, "value": cell.value,
             "sources": cell.sources}
            for block in blocks for row in block.rows for column, cell in zip(block.header, row)
            if cell.value is not None and cell.sources]
