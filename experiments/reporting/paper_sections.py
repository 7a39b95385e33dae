"""The paper's generated parts: the setup, one results subsection per comparison (tables, figures and the
sentences that state each result, made from the numbers), the discussion, limitations, conclusion and the
reproducibility appendix. A comparison the runs do not contain becomes a one-line note, never an empty
table; a statement is made only where a number supports it (``stats.verdict``, from the 95 % interval)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.harness.anomaly_maps import MAPS_DIR
from experiments.harness.results import METRIC_TITLES
from experiments.reporting import figures as pf
from experiments.reporting import map_figures as mf
from experiments.reporting import selection_tables as st
from experiments.reporting.comparisons import Comparison, Inputs, categories_of
from experiments.reporting.data import Run, first_run
from experiments.reporting.document import Block, Bullets, Code, FigureBlock, Gallery, Heading, Note, text
from experiments.reporting.finetune_evidence import agreement_table, curve_table, units_table
from experiments.reporting.paper_appendix import DIAGNOSTICS, commands_blocks, finetuned
from experiments.reporting.paper_setup import DATASET_TITLES, commit_blocks
from experiments.reporting.stats import EQUIVALENCE, EQUIVALENT, cell_stats, interval, signed, verdict
from experiments.reporting.tables import (
    PAIRED_METRICS,
    category_paired_table,
    category_table,
    main_table,
    paired_rows,
    paired_table,
    selection_table,
    summary_table,
)
from experiments.reporting.wording import listing, lower_first, plural, short_reason


def pixel_note(frame: pd.DataFrame, dataset: str) -> Note | None:
    """Where a dataset's runs have no pixel metrics (no masks: ELPV), why, as the runs recorded it; None where
    they have them."""
    rows = frame[frame["dataset"] == dataset]
    if rows.empty or rows["pixel_auroc"].notna().any():
        return None
    why = "; ".join(sorted({str(n) for n in rows["pixel_metrics_note"].dropna()})) or "not recorded"
    return Note(f"{dataset}: Pixel AUROC and AUPRO are shown as '-' (no pixel metrics: {why}).")


@dataclass
class Context(Inputs):
    """What the sections share: the inputs (runs, rows, comparisons, study manifest) and the output folder."""

    out: Path = Path("reports")
    gallery: bool = True   # the HTML's anomaly-map gallery (its PNGs copied next to the report)


def figure_blocks(built: list, out: Path) -> list[FigureBlock]:
    """The figures saved to ``out``/figures, as blocks of the document."""
    return [FigureBlock(figure.name, pf.save(figure, out / "figures"), figure.caption, figure.width)
            for figure in built]


def _mean(comparison: Comparison, arm, metric: str) -> float:
    return cell_stats(arm.rows, metric, None, categories_of(comparison))[0]


SAID = {"higher": "higher than the baseline", "lower": "lower than the baseline",
        EQUIVALENT: f"equivalent to the baseline within ±{EQUIVALENCE:g} points",
        "not resolved": "not resolved (the interval holds 0 and reaches beyond ±0.5 points)"}


def difference_sentence(arm: str, metric: str, diff: dict) -> str:
    """The difference, its interval and how it was made, the spread of the per-seed differences, and the verdict
    word (stats.verdict) it supports."""
    bounds = ("no interval" if math.isnan(diff["low"])
              else f"95% interval {signed(diff['low'])} to {signed(diff['high'])}")
    spread = f"; std over seeds {diff['seed_sd']:.2f}" if diff["n"] > 1 else ""
    said = SAID[verdict(diff)] if not math.isnan(diff["low"]) else "not resolved (one seed, no per-image scores)"
    return (f"*{arm}* changes mean {METRIC_TITLES[metric]} by {signed(diff['mean'])} points ({bounds}; "
            f"{diff['pairing']}{spread}): {said}.")


def results_blocks(ctx: Context) -> list[Block]:
    """The main table, then per dataset (a heading each when there are several) its comparisons."""
    blocks: list[Block] = [main_table(ctx.present)]
    several = len(ctx.datasets) > 1
    for dataset in ctx.datasets:
        if several:
            blocks.append(Heading(f"Results on {DATASET_TITLES.get(dataset, dataset)}", 2))
        blocks.append(pixel_note(ctx.frame, dataset))
        blocks += comparison_blocks(ctx, ctx.on(dataset), 3 if several else 2)
    agreement = agreement_table(ctx.present)
    if agreement is not None:
        blocks += [Heading("Does the checkpoint-selection proxy agree with the test set?", 2),
                   text("Fine-tuning keeps the checkpoint that the label-free proxy scores best (synthetic anomalies "
                        "of families disjoint from the test set's defects). Here its gain over step 0 is set against "
                        "the test's gain over the baseline, per fine-tuned arm and category."),
                   agreement, units_table(ctx.present)]
    blocks = [block for block in blocks if block is not None]  # tables with nothing to show
    gallery = gallery_items(ctx) if ctx.gallery else []
    if gallery:
        blocks += [Heading("Anomaly-map gallery", 2),
                   text("The HTML version of this report holds every saved anomaly map of the first seed of each arm "
                        "(test image, ground truth, map), browsable by comparison, category and arm."),
                   Gallery(gallery)]
    return blocks


SATURATED = 99.95  # image AUROC (%) at which a category leaves no room to differ


RESOLVED = {"higher": "Higher than the baseline (95% interval above 0)",
            "lower": "Lower than the baseline (95% interval below 0)"}


def resolved_sentence(word: str, found: list[tuple[str, str, dict]]) -> str | None:
    """The differences of one verdict (higher / lower), per metric: "arm mean [low, high]" in the comparison's
    order; how the intervals were made is the paired table's caption, not repeated here."""
    parts = []
    for metric in ("image_auroc", "pixel_auroc"):
        items = [f"*{arm}* {signed(diff['mean'])} [{signed(diff['low'])}, {signed(diff['high'])}]"
                 for arm, m, diff in found if m == metric and verdict(diff) == word]
        if items:
            parts.append(f"in {METRIC_TITLES[metric]}: {listing(items, '')}")
    return f"{RESOLVED[word]}, {'; '.join(parts)} points." if parts else None


def result_sentences(comparison: Comparison) -> list[str]:
    """What the tables below cannot say at a glance: the differences the intervals resolve (image or pixel
    AUROC) grouped by direction, the arms whose image-AUROC interval resolves nothing in one sentence, and the
    categories every arm saturates, on which no difference can show."""
    found = [(arm, metric, diff) for arm, metric, diff in paired_rows(comparison)
             if diff is not None and metric in ("image_auroc", "pixel_auroc")]
    said = [s for s in (resolved_sentence(word, found) for word in RESOLVED) if s]
    open_ = [arm for arm, metric, diff in found if metric == "image_auroc" and verdict(diff) == "not resolved"]
    same = [arm for arm, metric, diff in found if metric == "image_auroc" and verdict(diff) == EQUIVALENT]
    if same:
        said.append(f"Equivalent to the baseline in image AUROC (95% interval within ±{EQUIVALENCE:g} points): "
                    f"{listing([f'*{a}*' for a in same], '')}.")
    if open_:
        said.append(f"Not resolved in image AUROC (the 95% interval holds 0 and reaches beyond ±{EQUIVALENCE:g} "
                    f"points): {listing([f'*{a}*' for a in open_], '')}.")
    categories = categories_of(comparison)
    full = [c for c in categories if all(cell_stats(arm.rows, "image_auroc", c, categories)[0] >= SATURATED
                                         for arm in comparison.arms)]
    if full and len(full) < len(categories):
        rest = [c for c in categories if c not in full]
        named = listing(full, "")
        said.append(f"{named[0].upper()}{named[1:]} {'is' if len(full) == 1 else 'are'} at 100% image AUROC "
                    f"under every arm, so the image-AUROC differences rest on {listing(rest, '')}.")
    return said


def comparison_blocks(ctx: Context, comparisons: list[Comparison], level: int) -> list[Block | None]:
    """Each comparison's sentences, tables and figures (a note where it has no runs)."""
    blocks: list[Block | None] = []
    for comparison in comparisons:
        blocks.append(Heading(comparison.title, level))
        if comparison not in ctx.present:
            why = "; ".join(f"{arm}: {short_reason(reason)}" for arm, reason in comparison.missing) or "no runs"
            blocks.append(Note(f"Not in these runs: {lower_first(comparison.title)} ({why})."))
            continue
        if comparison.missing:
            blocks.append(Note("Left out of this comparison: " + "; ".join(f"{a}: {short_reason(r)}"
                                                                           for a, r in comparison.missing)))
        sentences = result_sentences(comparison)
        blocks += [text(" ".join(sentences))] if sentences else []
        blocks += [summary_table(comparison), paired_table(comparison), category_table(comparison, "image_auroc"),
                   category_paired_table(comparison)]
        arms, categories = pf.arms(comparison), categories_of(comparison)
        built = pf.sweep_figure(comparison) if comparison.sweep else \
            pf.roc_figure(arms, categories, f"roc_{comparison.name}", comparison.title)
        if shows_maps(comparison, comparisons):
            built += mf.gallery_figure(comparison, arms, f"maps_{comparison.name}")
        blocks += figure_blocks(built, ctx.out)
        if finetuned(comparison):
            blocks += [selection_table(comparison), curve_table(comparison),
                       text(f"Each fine-tuning's logs (loss, proxy, collapse monitors): appendix, *{DIAGNOSTICS}*.")]
        blocks += selection_blocks(comparison)
    return blocks


def shows_maps(comparison: Comparison, comparisons: list[Comparison]) -> bool:
    """A comparison of arms gets an anomaly-map grid; a sweep only when every comparison of its dataset is a
    sweep, and then only the first (each dataset shows its maps at least once: ELPV's training length)."""
    if not comparison.sweep:
        return True
    mine = [c for c in comparisons if c.dataset == comparison.dataset and c.arms and c.others]
    return all(c.sweep for c in mine) and mine[0] is comparison


def selection_blocks(comparison: Comparison) -> list[Block]:
    """A selection comparison's result in words (the choice and the oracle against the defaults, the rank
    agreement) and its tables (selection_tables.py); nothing for other comparisons."""
    found = st.selection_numbers(comparison)
    if found is None:
        return []
    said = [difference_sentence(name, "image_auroc", diff) for name, diff in
            ((st.CHOICE, found.choice_diff), (st.ORACLE, found.oracle_diff)) if diff is not None]
    notes = [Note("Not in the selection's numbers: " + "; ".join(found.notes))] if found.notes else []
    return [text(" ".join([*said, st.spearman_sentence(found)])), *notes, *st.selection_tables(found)]


def gallery_items(ctx: Context) -> list[tuple[str, str, str, str]]:
    """(comparison, arm, category, path relative to the report) of each saved map PNG, copied next to it."""
    items = []
    for comparison in ctx.present:
        for arm in comparison.arms:
            run = first_run(arm.runs)
            for png in sorted((run.folder / MAPS_DIR).glob("*/*.png")):
                target = ctx.out / "gallery" / comparison.name / _safe(arm.name) / png.parent.name / png.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, target)
                items.append((comparison.title, arm.name, png.parent.name, str(target.relative_to(ctx.out))))
    return items


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def discussion_blocks(ctx: Context) -> list[Block]:
    blocks: list[Block] = []
    for comparison in ctx.present:
        base = _mean(comparison, comparison.baseline, "image_auroc")
        best = max(comparison.arms, key=lambda a: _mean(comparison, a, "image_auroc"))
        rows = [(arm, metric, diff) for arm, metric, diff in paired_rows(comparison) if diff is not None]
        # in the comparison's order (numbers as numbers: train_limit=1, 2, 16), never sorted as text
        up, down, same = ([arm.name for arm in comparison.others if any(
            a == arm.name and verdict(diff) == word and metric in metrics for a, metric, diff in rows)]
            for word, metrics in (("higher", PAIRED_METRICS), ("lower", PAIRED_METRICS),
                                  (EQUIVALENT, ("image_auroc",))))
        best_mean = _mean(comparison, best, "image_auroc")
        parts = [f"*{comparison.title}.* " + (
            f"No arm reaches a higher mean image AUROC than the baseline ({base:.1f}%)." if best is comparison.baseline
            else f"The highest mean image AUROC, {best_mean:.1f}% (baseline {base:.1f}%), is reached by {best.name}.")]
        if up:
            parts.append(f"Higher than the baseline on at least one metric (95% interval above 0): {listing(up)}.")
        if down:
            parts.append(f"Lower on at least one metric (95% interval below 0): {listing(down)}.")
        if same:
            parts.append(f"Image AUROC {EQUIVALENT} of the baseline: {listing(same)}.")
        if not up and not down:
            parts.append("No arm's 95% interval excludes 0 on image AUROC, pixel AUROC or AUPRO; an effect smaller "
                         "than the intervals cannot be excluded.")
        fits = {arm.name: arm.rows["fit_s"].mean() for arm in comparison.arms}  # fine-tuning included (data.tidy)
        base_fit = fits[comparison.baseline.name]
        slow = [f"{name} ({value / base_fit:.1f}x)" for name, value in fits.items()
                if base_fit > 0 and not math.isnan(value) and value >= 1.5 * base_fit]
        if slow:
            parts.append(f"Fit time per category (fine-tuning included) against the baseline's {base_fit:.0f} s: "
                         f"{listing(slow)}.")
        blocks.append(text(" ".join(parts)))
    if not blocks:
        blocks.append(Note("No comparison with at least one arm besides the baseline: nothing to discuss."))
    return blocks


def limitations_blocks(ctx: Context) -> list[Block]:
    items = []
    if "textures" in ctx.datasets:
        items.append("The embedded textures set has synthetic defects (scratches, holes, colour changes, foreign "
                     "texture) on photographs of four textures: it shows how settings compare on such defects, not "
                     "what they reach on real industrial images such as MVTec AD @mvtec.")
    skipped = {lower_first(c.title): len(c.missing) for c in ctx.comparisons if c.missing}
    if skipped:
        where = "; ".join(f"{title}: {plural(n, 'arm')}" for title, n in skipped.items())
        items.append(f"{plural(sum(skipped.values()), 'arm')} could not be run here ({where}; each with its reason "
                     "in the setup's table of arms not run).")
    seeds = ctx.frame["seed"].nunique()
    if seeds < 3:
        items.append(f"{plural(seeds, 'seed')} only: the spreads over seeds and most intervals are missing or wide.")
    items.append("Image-AUROC intervals resample the test images (nominal and defective separately, the same images "
                 "for both arms) and the seeds; with three seeds or fewer the seed part is rough (the per-seed spread "
                 "is kept beside it). Pixel AUROC and AUPRO have no per-image scores in the run record: their "
                 "intervals are over seeds with the test images held fixed, so they leave out the test set's own "
                 "noise. Categories are few and not a sample of all inspection tasks: a pooled difference describes "
                 "these categories, not a population.")
    manifest = ctx.manifest or {}
    if str(manifest.get("study", "")).startswith("quick"):
        items.append("This is the quick smoke study (conf/study/quick.yaml): one seed, two categories, few training "
                     "images and few fine-tuning steps; its numbers check the pipeline and are not results.")
    return [Bullets([text(item).spans for item in items])]


def image_changes(comparisons: list[Comparison], *words: str) -> list[tuple[Comparison, str, dict]]:
    """(comparison, arm, difference) of every arm's mean image AUROC whose verdict is one of ``words`` (any
    without)."""
    return [(comparison, arm, diff) for comparison in comparisons for arm, metric, diff in paired_rows(comparison)
            if diff is not None and metric == "image_auroc" and (not words or verdict(diff) in words)]


def conclusion_blocks(ctx: Context) -> list[Block]:
    up, down, same = ([f"{arm} ({interval(diff)})" for _, arm, diff in image_changes(ctx.present, word)]
                      for word in ("higher", "lower", EQUIVALENT))
    n = len(ctx.present)
    against = "one baseline" if len(ctx.datasets) < 2 else "the baseline of its dataset"
    lines = [f"Over {plural(n, 'comparison')} on {ctx.dataset}, each against {against}:"]
    lines.append(f"higher mean image AUROC (95% interval above 0): {', '.join(up)}." if up else
                 "no arm's 95% interval shows a higher mean image AUROC than the baseline's.")
    if down:
        lines.append(f"Lower (95% interval below 0): {', '.join(down)}.")
    if same:
        lines.append(f"{EQUIVALENT[0].upper()}{EQUIVALENT[1:]}: {', '.join(same)}.")
    return [text(" ".join(lines))]


def software(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(the runs' git commits, their distinct package versions, each as one line), for both documents."""
    versions = (", ".join(f"{k} {v}" for k, v in (run.results.get("versions") or {}).items() if v) for run in runs)
    return sorted({str(run.results.get("git_commit")) for run in runs}), list(dict.fromkeys(versions))


def appendix_blocks(ctx: Context) -> list[Block]:
    blocks: list[Block] = commands_blocks(ctx)
    commits, versions = software(ctx.runs)
    blocks += [text(f"*Versions.* The runs ran from {plural(len(commits), 'git commit')} (a -dirty suffix: with "
                    "uncommitted changes) with these packages:"), Code("\n".join([*commits, *versions])),
               *commit_blocks(ctx)]
    blocks.append(text("*Where each number comes from.* Every run is one results.json (config hash in it); "
                       "paper.json lists the runs' folders, tables/sources.csv names, for every number in every "
                       "table, the results.json files it is computed from, and the HTML version shows them on each "
                       "cell."))
    return blocks
