"""``build_report``: runs in; the run digest out: tables, figures, digest.md, digest.pdf and digest.json (the
paper, report.pdf / report.html, is experiments/reporting/paper.py's).

The Markdown file and the PDF are written side by side from the same blocks (``_Output``), so they
hold the same text, tables and figures.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from core.io import write_json_atomic, write_text_atomic
from experiments.reporting import figures
from experiments.reporting.blocks import Block, Heading, Text, markdown, render
from experiments.reporting.data import Run, discover, drop_repeats, select, tidy
from experiments.reporting.pdf import Document
from experiments.reporting.sections import DATASET_TITLES, reproduce_text, setup_text
from experiments.reporting.tables import TABLE_METRICS, Table, metric_table, timing_table, to_markdown, write_table
from experiments.reporting.variants import label_variants, variant_order


class _Output:
    """digest.pdf and digest.md, written in step."""

    def __init__(self, out: Path, title: str) -> None:
        self.out = out
        self.doc = Document(out / "digest.pdf", title)
        self.doc.new_page()
        self.doc.heading(title, size=16)
        self.md = [f"# {title}\n"]

    def blocks(self, blocks: list[Block]) -> None:
        render(self.doc, blocks)
        self.md.append(markdown(blocks))

    def table(self, table: Table) -> None:
        self.doc.table(table)
        self.md.append(to_markdown(table))

    def figure(self, figure: figures.Figure) -> None:
        png, _ = figures.save(figure, self.out / "figures")
        self.doc.image(png, figure.caption)
        self.md.append(f"![{figure.name}](figures/{png.name})\n\n{figure.caption}\n")

    def close(self) -> int:
        """Finish both files; returns the number of PDF pages."""
        pages = self.doc.close()
        write_text_atomic(self.out / "digest.md", "\n".join(self.md))
        return pages


def gather(run_dirs: list[str], dataset: str | None) -> tuple[list[Run], pd.DataFrame, list[dict], str | None]:
    """(included runs, labelled; their tidy rows; the runs left out with the reason; the report's dataset)."""
    runs, broken = discover([Path(d) for d in run_dirs])
    included, excluded, dataset = select(runs, dataset)
    label_variants(included)
    left_out = [{"run_dir": str(run.folder), "reason": why} for run, why in excluded]
    left_out += [{"run_dir": str(folder), "reason": why} for folder, why in broken]
    frame, repeats = drop_repeats(tidy(included))
    left_out += repeats
    if not frame.empty:
        included = [run for run in included if str(run.folder) in set(frame["run_dir"])]
    return included, frame, left_out, dataset


def _tables(frame: pd.DataFrame, variants: list[str], folder: Path) -> list[Table]:
    """One table per metric and the timing table, each written as CSV, Markdown and LaTeX."""
    write_text_atomic(folder / "runs.csv", frame.to_csv(index=False))
    tables = [metric_table(frame, metric, variants) for metric in TABLE_METRICS]
    tables.append(timing_table(frame, variants))
    for table in tables:
        write_table(table, folder)
    return tables


def _figures(runs: list[Run], frame: pd.DataFrame, variants: list[str]) -> list[figures.Figure]:
    """The figures of the studies the runs contain (none for a study they do not)."""
    return [*figures.coreset_figures(runs, frame), *figures.layer_figures(runs, frame),
            *figures.cold_start_figures(runs, frame), *figures.roc_figures(runs, frame, variants),
            *figures.map_figures(runs, frame, variants)]


def _results(output: _Output, included: list[Run], frame: pd.DataFrame, tables_dir: Path, dataset: str,
             manifest: dict) -> list[str]:
    """Summary, setup, tables and figures of the included runs (at least one); returns the variants."""
    variants = variant_order(included)
    tables = _tables(frame, variants, tables_dir)
    manifest["tables"] = [table.name for table in tables]
    best = tables[0].mean.loc["mean"].dropna()
    if len(best):
        output.blocks([Text(f"Best mean image AUROC: {best.idxmax()} ({best.max():.1f}%) among {len(variants)} "
                            f"variant(s) over {frame['category'].nunique()} categories.")])
    output.blocks(setup_text(included, frame, dataset, variants))
    output.blocks([Heading("Results")])
    for table in tables:
        output.table(table)
    built = _figures(included, frame, variants)
    if built:
        output.doc.new_page()
        output.blocks([Heading("Figures")])
    for figure in built:
        output.figure(figure)
        manifest["figures"].append(figure.name)
    return variants


def build_report(run_dirs: list[str | Path], out: str | Path = "reports", dataset: str | None = None) -> dict:
    """Write the tables, figures, digest.md and digest.pdf; returns the manifest (also digest.json)."""
    out = Path(out)
    run_dirs = [str(d) for d in run_dirs]
    included, frame, left_out, dataset = gather(run_dirs, dataset)
    tables_dir = out / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(tables_dir / "excluded.csv",
                      pd.DataFrame(left_out, columns=["run_dir", "reason"]).to_csv(index=False))
    manifest: dict = {"dataset": dataset, "runs": [str(r.folder) for r in included],
                      "excluded": left_out, "tables": [], "figures": [], "pages": 0}
    title = f"PatchCore experiment report: {DATASET_TITLES.get(dataset, dataset) if dataset else 'no runs'}"
    output = _Output(out, title)
    created = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    output.blocks([Text(f"Generated {created} by experiments/report.py from {len(included)} complete run(s) on "
                        f"{dataset} found under {', '.join(run_dirs)}; {len(left_out)} left out (listed at the end).")])
    variants: list[str] = []
    if included:
        variants = _results(output, included, frame, tables_dir, dataset, manifest)
    else:  # in the PDF only, as before: digest.md goes straight to what was left out
        output.doc.paragraph("No complete run was found: run a sweep first (README: sweeps and the report).")
    output.blocks(reproduce_text(included, variants, left_out, run_dirs))
    manifest["pages"] = output.close()
    write_json_atomic(out / "digest.json", manifest)
    return manifest
