"""The run digest: every variant of the runs side by side (setup, a category x variant table per metric, time
and memory, the figures, one command per variant, the runs left out), as one more document of the report's
document model (document.py), from the same inputs, statistics, tables and figures as the paper. Rendered to
``digest.md`` (markdown_out.py) and, through the paper's Typst renderer, ``digest.typ`` / ``digest.pdf``;
``digest.json`` is its manifest. Tables: ``tables/<metric>.{csv,md,tex}``, ``timing``, each comparison's
differences to its baseline (``<comparison>_paired``, ``_paired_categories``: the paper's), ``runs.csv``,
``excluded.csv``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from core.io import write_json_atomic, write_text_atomic
from experiments.harness.run_key import BOOKKEEPING, IDENTITY, is_ignored
from experiments.reporting import figures, map_figures
from experiments.reporting.comparisons import Inputs, load, variant_order
from experiments.reporting.data import Run, flatten, sort_value, sweep_commands
from experiments.reporting.document import Block, Bullets, Code, Document, FigureBlock, Heading, Paragraph, Span
from experiments.reporting.markdown_out import to_markdown
from experiments.reporting.paper_sections import figure_blocks, pixel_note, software
from experiments.reporting.paper_setup import DATASETS, categories_sentence, dataset_title
from experiments.reporting.selection_tables import selection_numbers, selection_tables
from experiments.reporting.tables import (
    TABLE_METRICS,
    category_paired_table,
    metric_table,
    paired_table,
    timing_table,
    write_tables,
)
from experiments.reporting.typst_out import write_pdf
from experiments.reporting.wording import noun, plural

SETUP_SKIP = (*BOOKKEEPING, *IDENTITY)  # not listed as settings: bookkeeping, and what each run is of


def said(text: str) -> Paragraph:
    """A paragraph of plain text (run folders and labels may hold markup characters)."""
    return Paragraph([Span("text", text)])


def listed(items: list[str]) -> Bullets:
    return Bullets([[Span("text", item)] for item in items])


def _value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"  # ", ": long lists wrap in the PDF
    return "null" if value is None else str(value)


def settings(runs: list[Run]) -> tuple[dict, dict]:
    """(settings every run shares, settings that vary -> their values), over the flattened configs; a key
    missing from a run came into conf/ later (the run had its default) and counts for the runs that have it."""
    flats = [flatten(run.config) for run in runs]
    common, varied = {}, {}
    for key in sorted(set().union(*flats)):
        if is_ignored(key, SETUP_SKIP):
            continue
        values = {}
        for flat in flats:
            if key in flat:
                values.setdefault(_value(flat[key]), flat[key])
        if len(values) == 1:
            common[key] = next(iter(values))
        else:
            varied[key] = sorted(values, key=lambda shown: sort_value(values[shown]))
    return common, varied


def _variant_line(variant: str, members: list[Run]) -> str:
    backbone = members[0].config.get("backbone") or {}
    seeds = sorted({str(run.config.get("seed")) for run in members})
    weights = "ImageNet weights" if backbone.get("pretrained", True) else "RANDOM weights"
    return (f"{variant}: {backbone.get('arch') or backbone.get('model') or backbone.get('_target_')}, layers "
            f"{_value(backbone.get('layers'))}, {weights}; "
            f"{plural(len(members), 'run')}, {noun(len(seeds), 'seed')} {', '.join(seeds)}")


def setup(inputs: Inputs, variants: dict[str, list[Run]]) -> list[Block]:
    """Dataset, categories, variants, the settings that vary between the runs and those they share."""
    runs = inputs.runs
    common, varied = settings(runs)
    roots = sorted({str((run.config.get("dataset") or {}).get("root")) for run in runs})
    blocks: list[Block] = [
        Heading("Setup"),
        *(said(f"Dataset: {dataset}, {DATASETS.get(dataset, 'a dataset in MVTec AD layout.')}")
          for dataset in inputs.datasets),
        said(f"Read from {', '.join(roots)}."),
        said(categories_sentence(inputs.frame)),
        said(f"Variants ({len(variants)}): the backbone plus the settings that vary between the runs, where they "
             "differ from the backbone's defaults in conf/; runs that differ only in seed are repeats of one variant "
             "(the tables give the mean ± sample std over seeds)."),
        listed([_variant_line(v, members) for v, members in variants.items()])]
    if any((run.config.get("backbone") or {}).get("pretrained") is False for run in runs):
        blocks.append(said("Variants marked 'random weights' ran a randomly initialised backbone "
                           "(backbone.pretrained=false): they test the pipeline; their numbers say nothing about the "
                           "backbone and must not be read as results."))
    if varied:
        blocks += [said("Settings that vary between runs:"),
                   listed([f"{key}: {', '.join(values)}" for key, values in varied.items()])]
    return blocks + [said("Settings shared by every run (the resolved config; each run's full config is in its "
                          "results.json):"), Code("\n".join(f"{key}={value}" for key, value in common.items()))]


def reproduce(inputs: Inputs, variants: dict[str, list[Run]]) -> list[Block]:
    """Code version, the sweeps as run, one command per variant, this report's command, the runs left out."""
    runs, blocks = inputs.runs, [Heading("Reproducing these numbers")]
    commits, versions = software(runs)
    blocks.append(said(f"Code: git commit {', '.join(commits)}. Software: " + "; ".join(versions) + "."))
    commands = sweep_commands(runs)
    if commands:
        blocks += [said("The sweeps, as they were run (each job's folder holds its results.json):"),
                   Code("\n".join(commands))]
    lines = [f"# {variant}\n{min(members, key=lambda r: str(r.folder)).command}" for variant, members in
             variants.items()]
    blocks += [said("One run of each variant (other seeds: the same command with seed=<n>; each table cell is the "
                    "mean over the seeds listed in the setup):"), Code("\n".join(lines)),
               said("This report: python experiments/report.py " + " ".join(inputs.run_dirs))]
    if inputs.left_out:
        blocks += [Heading("Runs not in this report"),
                   listed([f"{row['run_dir']}: {row['reason']}" for row in inputs.left_out])]
    return blocks


def results(inputs: Inputs, variants: dict[str, list[Run]], out: Path) -> list[Block]:
    """The summary line, the setup, the tables and the figures (written to figures/)."""
    frame, names = inputs.frame, list(variants)
    tables = [*(metric_table(frame, metric, names) for metric in TABLE_METRICS), timing_table(frame, names)]
    best = pd.Series({v: c.value for v, c in zip(names, tables[0].rows[-1][1:])}, dtype=float).dropna()
    blocks: list[Block] = [said(f"Best mean image AUROC: {best.idxmax()} ({best.max():.1f}%) among "
                                f"{plural(len(names), 'variant')} over "
                                f"{plural(frame['category'].nunique(), 'category')}.")] if len(best) else []
    groups, categories = list(variants.items()), sorted(frame["category"].unique())
    sweeps = [figure for comparison in inputs.comparisons for figure in figures.sweep_figure(comparison)]
    maps = map_figures.map_figures(groups, categories)
    built = figure_blocks([*sweeps, *figures.roc_figure(groups, categories), *maps], out)
    notes = [note for note in (pixel_note(frame, dataset) for dataset in inputs.datasets) if note is not None]
    return [*blocks, *setup(inputs, variants), Heading("Results"), *notes, *tables, *differences(inputs),
            *([Heading("Figures")] if built else []), *built]


def differences(inputs: Inputs) -> list[Block]:
    """Each comparison's differences to its baseline, the paper's tables (stats.paired: the same intervals and
    verdicts as the paper states), and a selection comparison's choice, oracle and rank-agreement tables."""
    found = [table for comparison in inputs.present
             for table in (paired_table(comparison), category_paired_table(comparison)) if table is not None]
    found += [table for comparison in inputs.present for numbers in [selection_numbers(comparison)]
              if numbers is not None for table in selection_tables(numbers)]
    return [Heading("Differences to the baseline"), *found] if found else []


def build_digest(run_dirs: list[str | Path], out: str | Path = "reports", dataset: str | None = None,
                 inputs: Inputs | None = None, pdf: bool = True) -> dict:
    """Write the digest's tables, figures, digest.md and (``pdf``) digest.typ / digest.pdf; returns the
    manifest (also digest.json). ``inputs``: the runs already read (report.py reads them once for both)."""
    out, inputs = Path(out), inputs or load(run_dirs, dataset)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "tables" / "excluded.csv",
                      pd.DataFrame(inputs.left_out, columns=["run_dir", "reason"]).to_csv(index=False))
    title = "PatchCore experiment report: " + (dataset_title(inputs.datasets) if inputs.datasets else "no runs")
    subtitle = (f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by experiments/report.py from "
                f"{plural(len(inputs.runs), 'complete run')} on {inputs.dataset} found under "
                f"{', '.join(inputs.run_dirs)}; "
                f"{len(inputs.left_out)} left out (listed at the end).")
    variants = {v: [run for run in inputs.runs if run.variant == v] for v in variant_order(inputs.runs)}
    if inputs.runs:
        write_text_atomic(out / "tables" / "runs.csv", inputs.frame.to_csv(index=False))
        blocks = results(inputs, variants, out)
    else:
        blocks = [said("No complete run was found: run a sweep first (README: sweeps and the report).")]
    doc = Document(title, subtitle, blocks + reproduce(inputs, variants), {})
    manifest = {"dataset": inputs.dataset, "runs": [str(r.folder) for r in inputs.runs], "excluded": inputs.left_out,
                "tables": [table.name for table in write_tables(doc.blocks, out / "tables")],
                "figures": [b.name for b in doc.blocks if isinstance(b, FigureBlock)], "pages": 0,
                "pages_overflowing": []}
    write_text_atomic(out / "digest.md", to_markdown(doc))
    if pdf:
        _, manifest["pages_overflowing"], manifest["pages"] = write_pdf(doc, out, stem="digest")
    write_json_atomic(out / "digest.json", manifest)
    return manifest
