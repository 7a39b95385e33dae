"""The paper's tables, each cell carrying the number behind it and the results.json files it comes from, and
their CSV / Markdown / LaTeX copies (experiments/reporting/tables.py writes those)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.harness.results import METRIC_TITLES
from experiments.reporting.comparisons import Comparison, categories_of, cell_stats, paired
from experiments.reporting.document import Cell, TableBlock
from experiments.reporting.tables import Table, write_table

SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
PAIRED_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def number(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 and not math.isnan(std) else f"{mean:.1f}"


def signed(value: float) -> str:
    return f"{value:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0")


def _bold_best(rows: list[list[Cell]], columns: range, lower: bool = False) -> None:
    """Bold the best printed value of each column (ties all bold) when two or more rows have one."""
    for j in columns:
        shown = [(i, round(row[j].value, 1)) for i, row in enumerate(rows) if row[j].value is not None
                 and not math.isnan(row[j].value)]
        if len(shown) < 2:
            continue
        best = min(v for _, v in shown) if lower else max(v for _, v in shown)
        for i, value in shown:
            rows[i][j].bold = value == best


def summary_table(comparison: Comparison) -> TableBlock:
    """Arms x (each metric's mean over categories, mean ± std over seeds; fit time per category)."""
    categories = categories_of(comparison)
    header = ["arm", "seeds", *(METRIC_TITLES[m] for m in SUMMARY_METRICS), "fit s / category"]
    rows = []
    for arm in comparison.arms:
        row = [Cell(arm.name), Cell(str(len(arm.seeds)), float(len(arm.seeds)))]
        for metric in SUMMARY_METRICS:
            mean, std, n, sources = cell_stats(arm.rows, metric, None, categories)
            row.append(Cell(number(mean, std, n), None if math.isnan(mean) else mean, sources=sources))
        fit = arm.rows["fit_s"].mean()
        row.append(Cell("-" if math.isnan(fit) else f"{fit:.1f}", None if math.isnan(fit) else float(fit),
                        sources=sorted({str(Path(d) / "results.json") for d in arm.rows["run_dir"]})))
        rows.append(row)
    _bold_best(rows, range(2, 2 + len(SUMMARY_METRICS)))
    return TableBlock(f"{comparison.name}_summary", f"{comparison.title}: mean over the {len(categories)} categories "
                      "(%, mean ± std over seeds; best in bold) and fit time.", header, rows)


def category_table(comparison: Comparison, metric: str) -> TableBlock:
    """Arms x (categories + mean) of one metric."""
    categories = categories_of(comparison)
    rows = []
    for arm in comparison.arms:
        row = [Cell(arm.name)]
        for category in [*categories, None]:
            mean, std, n, sources = cell_stats(arm.rows, metric, category, categories)
            row.append(Cell(number(mean, std, n), None if math.isnan(mean) else mean, sources=sources))
        rows.append(row)
    _bold_best(rows, range(1, len(categories) + 2))
    return TableBlock(f"{comparison.name}_{metric}", f"{comparison.title}: {METRIC_TITLES[metric]} per category "
                      "(%, mean ± std over seeds; best per column in bold).", ["arm", *categories, "mean"], rows)


def paired_rows(comparison: Comparison) -> list[tuple[str, str, dict | None]]:
    categories = categories_of(comparison)
    return [(arm.name, metric, paired(comparison.baseline, arm, metric, categories))
            for arm in comparison.others for metric in PAIRED_METRICS]


def paired_table(comparison: Comparison) -> TableBlock | None:
    """Arms x (the paired difference against the baseline of each metric, with its 95% interval)."""
    categories = categories_of(comparison)
    base_sources = sorted({str(Path(d) / "results.json") for d in comparison.baseline.rows["run_dir"]})
    rows = []
    for arm in comparison.others:
        sources = sorted({*base_sources, *(str(Path(d) / "results.json") for d in arm.rows["run_dir"])})
        row, pairs = [Cell(arm.name)], 0
        for metric in PAIRED_METRICS:
            diff = paired(comparison.baseline, arm, metric, categories)
            if diff is None:
                row.append(Cell("-"))
                continue
            pairs = max(pairs, diff["n"])
            interval = "" if math.isnan(diff["low"]) else f" [{signed(diff['low'])}, {signed(diff['high'])}]"
            row.append(Cell(f"{signed(diff['mean'])}{interval}", diff["mean"], sources=sources))
        row.append(Cell(str(pairs), float(pairs)))
        rows.append(row)
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
            for metric in PAIRED_METRICS:
                mean, std, n, sources = cell_stats(arm.rows, metric, None, categories)
                row.append(Cell(number(mean, std, n), None if math.isnan(mean) else mean, sources=sources))
            row.append(Cell(str(len(arm.seeds)), float(len(arm.seeds))))
            rows.append(row)
    if not rows:
        return None
    _bold_best(rows, range(1, 1 + len(PAIRED_METRICS)))
    header = ["arm", *(METRIC_TITLES[m] for m in PAIRED_METRICS), "seeds"]
    return TableBlock("main", "Every arm of the study: mean over categories (%, mean ± std over seeds; best in bold).",
                      header, rows)


def write(block: TableBlock, folder: Path) -> list[Path]:
    """``tables/<name>.{csv,md,tex}`` (the CSV holds the numbers) through tables.write_table."""
    index = [row[0].text for row in block.rows]
    columns = block.header[1:]
    values = pd.DataFrame([[np.nan if c.value is None else c.value for c in row[1:]] for row in block.rows],
                          index=index, columns=columns)
    table = Table(f"paper_{block.name}", block.caption, block.header[0], index, columns,
                  [[c.text for c in row[1:]] for row in block.rows], [[c.bold for c in row[1:]] for row in block.rows],
                  values, rule_before=block.rule_before, note="values in %")
    return write_table(table, folder)


def sources_rows(blocks: list[TableBlock]) -> list[dict]:
    """One row per table cell with a number: where it comes from (tables/sources.csv, paper.json)."""
    rows = []
    for block in blocks:
        for row in block.rows:
            for column, cell in zip(block.header, row):
                if cell.value is not None and cell.sources:
                    rows.append({"table": block.name, "row": row[0].text, "column": column, "text": cell.text,
                                 "value": cell.value, "sources": cell.sources})
    return rows


def _sidecar_cell(value, sidecar: Path, digits: int = 3) -> Cell:
    return Cell("-" if value is None else f"{value:.{digits}f}", value, sources=[str(sidecar)])


def selection_table(comparison: Comparison) -> TableBlock | None:
    """Per fine-tuned arm and category (first seed): the checkpoint the proxy selected, from the sidecars
    (docs/finetuning.md): selected step of the steps run, proxy score and effective rank at step 0 and at the
    selected step, collapse warnings. None when the checkpoints have no selection record."""
    import json

    rows = []
    for arm in comparison.others:
        run = min(arm.runs, key=lambda r: (str(r.config.get("seed")), str(r.folder)))
        checkpoint = (run.config.get("backbone") or {}).get("checkpoint")
        if not checkpoint:
            continue
        for category in sorted(run.results.get("categories") or {}):
            sidecar = Path(str(checkpoint)).parent / f"{category}.json"
            try:
                record = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                continue
            selection = record.get("selection") or {}
            if not selection:
                continue
            start, chosen = selection.get("start") or {}, selection.get("proxy") or {}
            monitors = selection.get("monitors") or {}

            rows.append([Cell(f"{arm.name} / {category}"),
                         Cell(f"{record.get('selected_step')} of {record.get('steps')}", record.get("selected_step"),
                              sources=[str(sidecar)]),
                         _sidecar_cell(start.get("score"), sidecar), _sidecar_cell(chosen.get("score"), sidecar),
                         _sidecar_cell(start.get("effective_rank"), sidecar, 1),
                         _sidecar_cell(monitors.get("effective_rank"), sidecar, 1),
                         Cell(str(len(selection.get("collapse_warnings") or [])))])
    if not rows:
        return None
    header = ["arm / category", "selected step", "proxy at 0", "proxy selected", "eff. rank at 0",
              "eff. rank selected", "collapse warnings"]
    return TableBlock(f"{comparison.name}_selection", f"{comparison.title}: the checkpoint the proxy selected "
                      "(first seed; from each checkpoint's sidecar JSON, docs/finetuning.md).", header, rows)
