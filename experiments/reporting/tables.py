"""The report's tables: category x variant per metric (mean row, best per row in bold, mean +/- std over
seeds) and a timing/memory table, written as CSV, Markdown and LaTeX (booktabs).

Metric values are in percent. A cell is the mean over seeds; with several seeds it reads ``mean ± std``
(sample standard deviation). The mean row averages each seed's categories first (categories whose
metric is null, e.g. no masks, are skipped, as in results.json), then averages over seeds; it is left
empty for a variant that lacks some of the table's categories, so no mean hides a missing category.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.io import write_text_atomic
from experiments.harness.results import METRIC_TITLES
from experiments.reporting.data import seed_means

TABLE_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")  # the metrics with a table, in order
MEAN_ROW = "mean"


@dataclass
class Table:
    name: str                      # file stem
    title: str
    corner: str                    # header of the first column
    index: list[str]               # row labels
    columns: list[str]             # column labels
    cells: list[list[str]]         # formatted text, plain
    bold: list[list[bool]]
    mean: pd.DataFrame             # numbers behind the cells (index x columns)
    std: pd.DataFrame | None = None
    rule_before: int | None = None  # a \midrule before this row (the mean row)
    note: str = ""


def _cell(mean: float, std: float, n: int, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if n > 1 and not math.isnan(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def metric_table(frame: pd.DataFrame, metric: str, variants: list[str]) -> Table:
    """Categories (+ mean) x variants of ``metric`` in percent."""
    categories = sorted(frame["category"].unique())
    mean = pd.DataFrame(np.nan, index=[*categories, MEAN_ROW], columns=variants)
    std = mean.copy()
    count = pd.DataFrame(0, index=mean.index, columns=variants)
    for variant in variants:
        rows = frame[frame["variant"] == variant]
        for category in categories:
            values = rows.loc[rows["category"] == category, metric].dropna() * 100
            if len(values):
                mean.loc[category, variant] = values.mean()
                std.loc[category, variant] = values.std(ddof=1) if len(values) > 1 else np.nan
                count.loc[category, variant] = len(values)
        per_seed = [100 * value for value in seed_means(rows, metric, categories)]
        if per_seed:
            mean.loc[MEAN_ROW, variant] = float(np.mean(per_seed))
            std.loc[MEAN_ROW, variant] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else np.nan
            count.loc[MEAN_ROW, variant] = len(per_seed)
    cells, bold = [], []
    for row in mean.index:
        values = mean.loc[row].round(1)  # best as printed: equal printed values are all bold
        best = values.max() if values.notna().sum() >= 2 else None
        cells.append([_cell(mean.loc[row, v], std.loc[row, v], count.loc[row, v]) for v in variants])
        bold.append([best is not None and not math.isnan(values[v]) and values[v] >= best for v in variants])
    seeds = int(count.values.max()) if count.size else 0
    note = f"{METRIC_TITLES[metric]} in %"
    note += "; mean ± sample std over seeds" if seeds > 1 else ""
    note += "; best per row in bold."
    return Table(metric, METRIC_TITLES[metric], "category", [*categories, MEAN_ROW], variants, cells, bold,
                 mean, std if seeds > 1 else None, rule_before=len(categories), note=note)


TIMING_COLUMNS = ("categories", "seeds", "fit s / category", "coreset s / category", "test images / s",
                  "bank size", "peak RSS MB")


def timing_table(frame: pd.DataFrame, variants: list[str]) -> Table:
    """Per variant: fit time (extraction + coreset) and coreset time per category, inference throughput,
    memory-bank size (mean over categories) and the runs' peak resident memory."""
    numbers = pd.DataFrame(np.nan, index=variants, columns=list(TIMING_COLUMNS))
    for variant in variants:
        rows = frame[frame["variant"] == variant]
        predict = rows["predict_s"].sum()
        numbers.loc[variant] = [
            rows["category"].nunique(), rows["seed"].nunique(),
            rows["fit_s"].mean(), rows["coreset_s"].mean(),
            rows["n_test"].sum() / predict if predict > 0 else np.nan,
            rows["bank_size"].mean(), rows["peak_rss_mb"].max(),
        ]
    formats = ("{:.0f}", "{:.0f}", "{:.1f}", "{:.1f}", "{:.1f}", "{:.0f}", "{:.0f}")
    cells = [["-" if math.isnan(numbers.loc[v, c]) else f.format(numbers.loc[v, c])
              for c, f in zip(TIMING_COLUMNS, formats)] for v in variants]
    bold = [[False] * len(TIMING_COLUMNS) for _ in variants]
    note = ("Times in seconds, means over categories and seeds; fit = feature extraction + coreset selection; "
            "throughput = test images / prediction time; peak RSS = the largest of the runs' peak resident memory.")
    return Table("timing", "Time and memory", "variant", list(variants), list(TIMING_COLUMNS), cells, bold,
                 numbers, note=note)


# ------------------------------------------------------------------------------------------- writers


def to_markdown(table: Table) -> str:
    header = [table.corner, *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", *["---:"] * len(table.columns)]) + "|"]
    for label, cells, bold in zip(table.index, table.cells, table.bold):
        shown = [f"**{c}**" if b else c for c, b in zip(cells, bold)]
        label = f"**{label}**" if label == MEAN_ROW and table.rule_before is not None else label
        lines.append("| " + " | ".join([label, *shown]) + " |")
    return f"**{table.title}** ({table.note})\n\n" + "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    def cell(text: str, bold: bool) -> str:
        text = latex_escape(text).replace("±", r"$\pm$")
        return rf"\textbf{{{text}}}" if bold else text

    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join([latex_escape(table.corner), *map(latex_escape, table.columns)]) + r" \\", r"\midrule"]
    for i, (label, cells, bold) in enumerate(zip(table.index, table.cells, table.bold)):
        if table.rule_before is not None and i == table.rule_before:
            lines.append(r"\midrule")
        lines.append(" & ".join([latex_escape(label), *(cell(c, b) for c, b in zip(cells, bold))]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{latex_escape(table.title)} ({latex_escape(table.note)})}}",
              rf"\label{{tab:{table.name}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: Table, folder: Path) -> list[Path]:
    """``<name>.csv`` (the numbers; ``<name>_std.csv`` with several seeds), ``.md`` and ``.tex``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(folder / f"{table.name}.csv", table.mean.rename_axis(table.corner).to_csv())]
    if table.std is not None:
        written.append(write_text_atomic(folder / f"{table.name}_std.csv",
                                         table.std.rename_axis(table.corner).to_csv()))
    written.append(write_text_atomic(folder / f"{table.name}.md", to_markdown(table)))
    written.append(write_text_atomic(folder / f"{table.name}.tex", to_latex(table)))
    return written
