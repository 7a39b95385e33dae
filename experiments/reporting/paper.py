"""``build_paper``: the paper as ``report.pdf`` (Typst), ``report.html``, ``report.typ``,
``tables/paper_*.{csv,md,tex}``, ``tables/sources.csv`` and ``paper.json``. The text is
``reports/paper/<section>.md`` with placeholders (document.py) filled from the runs (paper_sections.py), so a
re-run leaves no stale number behind.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml

from core.io import write_json_atomic, write_text_atomic
from experiments.reporting import paper_sections as ps
from experiments.reporting.comparisons import Comparison, Inputs, categories_of, load
from experiments.reporting.data import setting
from experiments.reporting.document import (
    Bibliography,
    Block,
    Document,
    FigureBlock,
    Heading,
    Note,
    PageBreak,
    parse_source,
)
from experiments.reporting.html_out import to_html
from experiments.reporting.intervals import REPLICATES
from experiments.reporting.paper_appendix import diagnostics_blocks
from experiments.reporting.paper_sections import dataset_title
from experiments.reporting.stats import EQUIVALENCE, EQUIVALENT, cell_stats, signed
from experiments.reporting.tables import sources_rows, write_tables
from experiments.reporting.typst_out import write_pdf

SOURCES = Path(__file__).resolve().parents[2] / "reports" / "paper"
SECTIONS = {"abstract": "Abstract", "introduction": "Introduction", "related_work": "Related work",
            "method": "Method", "setup": "Experimental setup", "results": "Results", "discussion": "Discussion",
            "limitations": "Limitations", "conclusion": "Conclusion", "appendix": "Reproducibility"}
SECTION_TITLES = tuple(SECTIONS.values())
# The settings method.md's paragraph on the differences to the official code discusses ({{differences_effect}}):
# arms of any comparison that change them from the baseline this way are quoted there.
DISCUSSED = {"patchcore.embedder.aggregation": "channel_mean", "patchcore.scoring.distance": "squared"}


def discussed_effects(comparisons: list[Comparison]) -> list[str]:
    """The image-AUROC sentence of every arm that changes a DISCUSSED setting from its baseline that way."""
    def changes(comparison: Comparison, arm: str) -> bool:
        base = comparison.baseline.runs[0].config
        config = next(a for a in comparison.others if a.name == arm).runs[0].config
        return any(setting(config, key) == value != setting(base, key) for key, value in DISCUSSED.items())

    return [ps.difference_sentence(arm, "image_auroc", diff) for comparison, arm, diff in ps.image_changes(comparisons)
            if changes(comparison, arm)]


def values(ctx: ps.Context) -> dict[str, str]:
    """Every placeholder of the text sources."""
    present, base = ctx.present, ctx.baseline
    titles = [c.title.lower() for c in present]
    compared = (", ".join(titles[:-1]) + (" and " if len(titles) > 1 else "") + titles[-1]) if titles \
        else "no other arm (these runs hold the baseline only)"
    found = [f"{arm} ({comparison.title.lower()}: {signed(diff['mean'])} points)"
             for comparison, arm, diff in ps.image_changes(present, "higher", "lower")]
    reached = []
    for dataset in ctx.datasets:  # each dataset's baseline, over its categories
        first = next((c for c in present if c.dataset == dataset), None)
        if first is not None:
            mean = cell_stats(first.baseline.rows, 'image_auroc', None, categories_of(first))[0]
            reached.append(f"{mean:.1f}%" + (f" on {dataset}" if len(ctx.datasets) > 1 else ""))
    abstract = f"The baseline reaches a mean image AUROC of {', '.join(reached)}. " if base and reached else ""
    abstract += (f"Changes of mean image AUROC whose 95% interval excludes zero: {'; '.join(found)}." if found
                 else "No compared arm's 95% interval of the mean image-AUROC difference excludes zero.")
    same = [arm for _, arm, _ in ps.image_changes(present, EQUIVALENT)]
    abstract += f" Equivalent within ±{EQUIVALENCE:g} points (95% interval inside): {', '.join(same)}." if same else ""
    said = discussed_effects(present)
    effect = ("Measured here: " + " ".join(said)) if said else \
        "Their effect was not measured in these runs (no arm changes the aggregation or the distance)."
    return {"dataset_title": dataset_title(ctx.datasets), "compared_list": compared,
            "abstract_results": abstract, "n_runs": str(len(ctx.runs)), "n_results": str(len(ctx.frame)),
            "n_seeds": str(ctx.frame["seed"].nunique()), **ps.baseline_settings(ctx),
            "differences_effect": effect, "replicates": str(REPLICATES), "equivalence": f"{EQUIVALENCE:g}"}


def compose(ctx: ps.Context) -> list[Block]:
    """The sections' text with the values and the generated blocks filled in."""
    generated = {"setup_blocks": ps.setup_blocks(ctx), "results_blocks": ps.results_blocks(ctx),
                 "discussion_blocks": ps.discussion_blocks(ctx), "limitations_blocks": ps.limitations_blocks(ctx),
                 "conclusion_blocks": ps.conclusion_blocks(ctx), "appendix_blocks": ps.appendix_blocks(ctx),
                 "diagnostics_blocks": diagnostics_blocks(ctx, ps.figure_blocks)}
    filled, blocks = values(ctx), []
    for section in SECTIONS:
        path = SOURCES / f"{section}.md"
        blocks += [Bibliography(), PageBreak()] if section == "appendix" else []
        parsed = parse_source(path.read_text(), filled, generated, str(path))
        if section == "abstract" and parsed and isinstance(parsed[0], Heading):
            parsed[0].numbered = False
        blocks += parsed
    return blocks


def title(ctx: ps.Context) -> str:
    manifest = ctx.manifest or {}
    title = f"PatchCore under cold start: a comparative study on {dataset_title(ctx.datasets)}"
    if str(manifest.get("study", "")).startswith("quick"):
        title = f"[QUICK SMOKE STUDY, not results] {title}"
    jobs = manifest.get("jobs") or []
    finished = sum(row.get("status") in ("done", "done before") for row in jobs)
    return f"[PARTIAL: {finished} of {len(jobs)} jobs finished] {title}" if finished < len(jobs) else title


def build_paper(run_dirs: list[str | Path], out: str | Path = "reports", dataset: str | None = None,
                inputs: Inputs | None = None) -> dict:
    """Write the paper (PDF, HTML, Typst source, tables, sources); returns its manifest (also paper.json).
    ``inputs``: the runs already read (experiments/report.py reads them once for both documents)."""
    out, inputs = Path(out), inputs or load(run_dirs, dataset)
    ctx = ps.Context(**vars(inputs), out=out)
    run_dirs, manifest, full = inputs.run_dirs, inputs.manifest or {}, bool(inputs.runs and inputs.comparisons)
    references = yaml.safe_load((SOURCES / "references.yml").read_text())
    if full:
        study = f"study {manifest.get('study')}, " if manifest else ""
        doc = Document(title(ctx), f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by experiments/"
                       f"report.py from {len(ctx.runs)} runs ({study}{', '.join(run_dirs)})", compose(ctx), references)
    else:
        why = f"; {len(inputs.left_out)} left out (see tables/excluded.csv)" if inputs.left_out else ""
        doc = Document("PatchCore comparative study: no runs", f"experiments/report.py {' '.join(run_dirs)}",
                       [Note(f"No complete run was found under {', '.join(run_dirs)}{why}: run `make study` first.")],
                       references)
    tables = write_tables(doc.blocks, out / "tables", "paper_")
    cells = sources_rows(tables)
    write_text_atomic(out / "tables" / "sources.csv", "table,row,column,value,sources\n" + "".join(
        f"{c['table']},\"{c['row']}\",\"{c['column']}\",{c['value']:.6g},{';'.join(c['sources'])}\n" for c in cells))
    _, overflowing, _ = write_pdf(doc, out, SOURCES / "references.yml", floats=True)
    write_text_atomic(out / "report.html", to_html(doc))
    described = {c.name: {"title": c.title, "arms": [a.name for a in c.arms], "missing": [list(m) for m in c.missing]}
                 for c in inputs.comparisons}
    record = {"dataset": inputs.dataset, "datasets": inputs.datasets, "study": manifest.get("study"),
              "runs": [str(r.folder) for r in ctx.runs],
              "excluded": inputs.left_out, "comparisons": described, "sections": list(SECTION_TITLES) if full else [],
              "tables": [t.name for t in tables], "figures": [b.path for b in doc.blocks if isinstance(b, FigureBlock)],
              "cells": cells, "pages_overflowing": overflowing}
    write_json_atomic(out / "paper.json", record)
    if (manifest.get("config") or {}).get("logger") == "wandb":
        from experiments.reporting.paper_wandb import log_main_table

        log_main_table(ctx, out)
    return record
