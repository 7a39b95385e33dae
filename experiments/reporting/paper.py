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
from experiments.reporting.claims import Claim, Quantities, failure, resolve
from experiments.reporting.comparisons import Comparison, Inputs, categories_of, load
from experiments.reporting.data import setting
from experiments.reporting.document import (
    Bibliography,
    Block,
    Cell,
    Document,
    FigureBlock,
    Heading,
    Note,
    PageBreak,
    TableBlock,
    parse_source,
)
from experiments.reporting.front_matter import FrontMatter
from experiments.reporting.html_out import to_html
from experiments.reporting.intervals import REPLICATES
from experiments.reporting.paper_appendix import diagnostics_blocks
from experiments.reporting.paper_setup import baseline_settings, dataset_title, finetune_values, setup_blocks
from experiments.reporting.replication import replication_blocks
from experiments.reporting.stats import EQUIVALENCE, EQUIVALENT, cell_stats, signed
from experiments.reporting.tables import sources_rows, write_tables
from experiments.reporting.typst_out import write_pdf
from experiments.reporting.wording import listing, lower_first, pluralise_template
from extensions.checkpoint import is_finetuned

SOURCES = Path(__file__).resolve().parents[2] / "reports" / "paper"
WRITTEN = SOURCES / "written"  # <study>/<section>.md: a study's text written by people (claims.py)
SECTIONS = {"abstract": "Abstract", "introduction": "Introduction", "related_work": "Related work",
            "method": "Method", "setup": "Experimental setup", "results": "Results", "replication": "Replication",
            "discussion": "Discussion",
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
    compared = listing([lower_first(c.title) for c in present], "no other arm (these runs hold the baseline only)")
    found = [f"{arm} ({lower_first(comparison.title)}: {signed(diff['mean'])} points)"
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
            "n_seeds": str(ctx.frame["seed"].nunique()), **baseline_settings(ctx), **finetune_values(ctx),
            "differences_effect": effect, "replicates": str(REPLICATES), "equivalence": f"{EQUIVALENCE:g}"}


def section_source(section: str, study: str | None, written: Path | None) -> Path:
    """The section's text: the study's written one (``<written>/<study>/<section>.md``, by people, its numbers
    and claims checked: claims.py) where there is one, else the generated draft's (``reports/paper/``)."""
    if written is not None and study and (written / study / f"{section}.md").is_file():
        return written / study / f"{section}.md"
    return SOURCES / f"{section}.md"


def compose(ctx: ps.Context, written: Path | None = None, mark: bool = False,
            claims: list[Claim] | None = None, bench: Path | None = None,
            texts: dict[str, str] | None = None) -> list[Block]:
    """The sections' text with the values and the generated blocks filled in; the written text's numbers
    filled and its claims evaluated (into ``claims``; a failing one marked in the text when ``mark``); ``bench``:
    make bench's results.jsonl for the replication section's speed ratios; ``texts``: receives each written
    section's text as printed (paper.json keeps it, so that a quote elsewhere, the README's, can be checked)."""
    generated = {"replication_blocks": replication_blocks(ctx.present, ctx.datasets, bench),
                 "setup_blocks": setup_blocks(ctx), "results_blocks": ps.results_blocks(ctx),
                 "discussion_blocks": ps.discussion_blocks(ctx), "limitations_blocks": ps.limitations_blocks(ctx),
                 "conclusion_blocks": ps.conclusion_blocks(ctx), "appendix_blocks": ps.appendix_blocks(ctx),
                 "diagnostics_blocks": diagnostics_blocks(ctx, ps.figure_blocks)}
    filled, blocks, quantities = values(ctx), [], Quantities(ctx.present)
    claims = [] if claims is None else claims
    for section in SECTIONS:
        path = section_source(section, (ctx.manifest or {}).get("study"), written)
        blocks += [Bibliography(), PageBreak()] if section == "appendix" else []
        text, found = resolve(pluralise_template(path.read_text(), filled), str(path), quantities, mark)
        claims += found
        if texts is not None and path.parent != SOURCES:
            texts[section] = text
        parsed = parse_source(text, filled, generated, str(path))
        if section == "abstract" and parsed and isinstance(parsed[0], Heading):
            parsed[0].numbered = False
        blocks += parsed
    if claims:
        blocks += [Heading("Claims of the written text, checked against the runs", 2), claims_table(claims)]
    return blocks


def claims_table(claims: list[Claim]) -> TableBlock:
    """Every claim the written text makes, the number behind it and whether it holds (the build failed otherwise,
    unless run with --mark-failed-claims)."""
    rows = [[Cell(c.source.rsplit("/", 1)[-1]), Cell(c.condition), Cell(c.value), Cell("yes" if c.holds else "NO")]
            for c in claims]
    return TableBlock("claims", "Claims of the written text: each sentence's condition on the results, its value in "
                      "these runs, and whether it holds (make report fails when one does not).",
                      ["file:line", "claim", "value", "holds"], rows)


def default_title(ctx: ps.Context) -> str:
    """A title that says what the runs compare: feature extractors, fine-tuning, label-free selection (cold
    start), other settings."""
    present = ctx.present
    arms = [arm for c in present for arm in c.others]
    # by identity: arms hold data frames, whose == is element-wise
    tuned = {id(arm) for arm in arms if is_finetuned(arm.runs[0].config.get("backbone") or {})}
    subjects = []
    if any(arm.runs[0].model == "patchcore" and arm.runs[0].backbone != c.baseline.runs[0].backbone
           and id(arm) not in tuned for c in present for arm in c.others):
        subjects.append("feature extractors")
    if tuned:
        subjects.append("fine-tuning")
    if any(c.selection for c in present):
        subjects.append("label-free model selection under cold start")
    if any(arm.runs[0].backbone == c.baseline.runs[0].backbone and id(arm) not in tuned and not c.selection
           for c in present for arm in c.others):
        subjects.append("settings")
    return f"A comparative study of PatchCore {listing(subjects, '')} on {dataset_title(ctx.datasets)}".replace(
        "PatchCore  on", "PatchCore on")


def title(ctx: ps.Context, front: FrontMatter | None = None) -> str:
    manifest = ctx.manifest or {}
    title = (front.title if front and front.title else None) or default_title(ctx)
    if str(manifest.get("study", "")).startswith("quick"):
        title = f"[QUICK SMOKE STUDY, not results] {title}"
    jobs = manifest.get("jobs") or []
    finished = sum(row.get("status") in ("done", "done before") for row in jobs)
    return f"[PARTIAL: {finished} of {len(jobs)} jobs finished] {title}" if finished < len(jobs) else title


def build_paper(run_dirs: list[str | Path], out: str | Path = "reports", dataset: str | None = None,
                inputs: Inputs | None = None, front: FrontMatter | None = None, written: Path | None = WRITTEN,
                mark_claims: bool = False, bench: Path | None = None, gallery: bool = True) -> dict:
    """Write the paper (PDF, HTML, Typst source, tables, sources); returns its manifest (also paper.json).
    ``inputs``: the runs already read (experiments/report.py reads them once for both documents); ``front``: the
    title, authors and affiliation (default: FrontMatter.of the study manifest); ``written``: the folder of the
    studies' written text (claims.py). A claim of the written text that the runs do not support raises
    ClaimError before anything is written, unless ``mark_claims`` (then it is marked in the text); ``bench``: make
    bench's results.jsonl, whose speed ratios the replication section prints; ``gallery``: False leaves the HTML's
    anomaly-map gallery out (a copy that must stay small: reports/reference/)."""
    out, inputs = Path(out), inputs or load(run_dirs, dataset)
    front = front or FrontMatter.of(inputs.manifest)
    ctx, claims, texts = ps.Context(**vars(inputs), out=out, gallery=gallery), [], {}
    run_dirs, manifest, full = inputs.run_dirs, inputs.manifest or {}, bool(inputs.runs and inputs.comparisons)
    references = yaml.safe_load((SOURCES / "references.yml").read_text())
    if full:
        study = f"study {manifest.get('study')}, " if manifest else ""
        doc = Document(title(ctx, front), f"{front.byline()}. " * bool(front.byline()) + f"Generated "
                       f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by experiments/report.py from "
                       f"{len(ctx.runs)} runs ({study}{', '.join(run_dirs)})",
                       compose(ctx, written, mark_claims, claims, bench, texts), references)
        if (error := failure(claims)) is not None and not mark_claims:
            raise error
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
    record = {"title": doc.title, "authors": front.authors, "affiliation": front.affiliation,
              "dataset": inputs.dataset, "datasets": inputs.datasets, "study": manifest.get("study"),
              "runs": [str(r.folder) for r in ctx.runs],
              "excluded": inputs.left_out, "comparisons": described, "sections": list(SECTION_TITLES) if full else [],
              "tables": [t.name for t in tables], "figures": [b.path for b in doc.blocks if isinstance(b, FigureBlock)],
              "cells": cells, "pages_overflowing": overflowing, "claims": [c.record() for c in claims],
              "written": texts}
    write_json_atomic(out / "paper.json", record)
    if (manifest.get("config") or {}).get("logger") == "wandb":
        from experiments.reporting.paper_wandb import log_main_table

        log_main_table(ctx, out)
    return record
