"""The paper's generated parts: the setup, one results subsection per comparison (tables, figures and the
sentences that state each result, made from the numbers), the discussion, limitations, conclusion and the
reproducibility appendix. A comparison the runs do not contain becomes a one-line note, never an empty
table; a statement is made only where a number supports it (``comparisons.verdict``)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from experiments.harness.anomaly_maps import MAPS_DIR
from experiments.harness.results import METRIC_TITLES
from experiments.reporting import paper_figures as pf
from experiments.reporting.comparisons import Comparison, categories_of, cell_stats, verdict
from experiments.reporting.data import Run
from experiments.reporting.document import Block, Bullets, Code, FigureBlock, Gallery, Heading, Note, TableBlock, text
from experiments.reporting.paper_tables import (
    category_table,
    paired_rows,
    paired_table,
    selection_table,
    signed,
    summary_table,
)
from experiments.reporting.sections import DATASETS
from extensions.checkpoint import is_finetuned


class Context:
    """What the sections share: the runs, their rows, the comparisons, the study manifest, the output folder."""

    def __init__(self, runs: list[Run], frame: pd.DataFrame, comparisons: list[Comparison], manifest: dict | None,
                 out: Path, dataset: str) -> None:
        self.runs, self.frame, self.comparisons, self.manifest = runs, frame, comparisons, manifest
        self.out, self.dataset = out, dataset
        self.tables: list[TableBlock] = []
        self.figures: list[str] = []

    @property
    def present(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.arms and c.others]

    @property
    def absent(self) -> list[Comparison]:
        return [c for c in self.comparisons if not (c.arms and c.others)]

    def table(self, block: TableBlock | None) -> list[Block]:
        if block is None:
            return []
        self.tables.append(block)
        return [block]

    def figure(self, built: list) -> list[Block]:
        blocks = []
        for figure in built:
            path = pf.save(figure, self.out / "figures")
            self.figures.append(path)
            blocks.append(FigureBlock(figure.name, path, figure.caption))
        return blocks


def _mean(comparison: Comparison, arm, metric: str) -> float:
    return cell_stats(arm.rows, metric, None, categories_of(comparison))[0]


def setup_blocks(ctx: Context) -> list[Block]:
    frame = ctx.frame
    blocks: list[Block] = [text(f"*Data.* {ctx.dataset}: {DATASETS.get(ctx.dataset, 'a dataset in MVTec AD layout.')}")]
    counts = frame.groupby("category").agg(n_train=("n_train", "max"), n_test=("n_test", "max"))
    blocks.append(text("Categories (nominal training images / test images): " + ", ".join(
        f"{c} ({int(r.n_train)}/{int(r.n_test)})" for c, r in counts.iterrows()) + "."))
    base = next((c.baseline for c in ctx.comparisons if c.arms), None)
    if base is not None:
        config = base.runs[0].config
        backbone, patchcore = config.get("backbone") or {}, config.get("patchcore") or {}
        coreset, data = config.get("coreset") or {}, config.get("dataset") or {}
        blocks.append(text(
            f"*Baseline.* {backbone.get('name')} ({backbone.get('_target_', '').rsplit('.', 1)[-1]}, pretrained "
            f"weights), layers {'+'.join(map(str, backbone.get('layers') or []))}; aggregation "
            f"{patchcore.get('aggregation')}, neighbourhood {patchcore.get('patch_size')}, "
            f"{patchcore.get('embed_dim')} dimensions; greedy coreset ratio {coreset.get('ratio')}; "
            f"k = {patchcore.get('num_neighbors')}, "
            f"{patchcore.get('distance')} distance, {patchcore.get('image_score')} image score, map blur sigma "
            f"{patchcore.get('blur_sigma')}; images resized to {data.get('resize')} and centre-cropped to "
            f"{data.get('image_size')} px, ImageNet normalisation; nominal training images per category: "
            f"{data.get('train_limit') or 'all'}."))
    seeds = sorted(frame["seed"].dropna().unique().tolist())
    blocks.append(text(f"*Seeds.* {len(seeds)} ({', '.join(map(str, seeds))}): each seed sets the coreset's "
                       "projection and start points, the training subset of the cold start, the fine-tuning run and "
                       "the CAE's initialisation; deterministic arms (the full bank) run once."))
    arms = [f"{c.title}: {', '.join(a.name for a in c.others)}" for c in ctx.present]
    if arms:
        blocks += [text("*Arms compared with the baseline:*"), Bullets([text(a).spans for a in arms])]
    manifest = ctx.manifest or {}
    machine = manifest.get("machine") or {}
    if machine:
        device = machine.get("cuda") or (f"CPU only, {machine.get('cpus')} cores, torch on "
                                         f"{machine.get('torch_threads')} threads")
        blocks.append(text(f"*Hardware.* {device}; Python {machine.get('python')}, torch {machine.get('torch')}."))
    blocks.append(text(run_time_sentence(ctx)))
    return blocks


def run_time_sentence(ctx: Context) -> str:
    manifest = ctx.manifest or {}
    jobs = manifest.get("jobs") or []
    if jobs:
        total = sum(row.get("duration_s") or 0 for row in jobs)
        done = sum(row["status"] in ("done", "done before") for row in jobs)
        by_kind = {}
        for row in jobs:
            if row.get("duration_s"):
                by_kind.setdefault(row["kind"], []).append(row["duration_s"])
        parts = ", ".join(f"{len(v)} {k} jobs {sum(v) / 60:.0f} min (mean {sum(v) / len(v):.0f} s)"
                          for k, v in sorted(by_kind.items()))
        return (f"*Run time.* Study `{manifest.get('study')}`: {done} of {len(jobs)} jobs finished, "
                f"{total / 3600:.2f} h of job time in all ({parts}).")
    total = ctx.frame.drop_duplicates("run_dir")["total_time_s"].sum()
    return f"*Run time.* {len(ctx.runs)} runs, {total / 3600:.2f} h in all (results.json total_time_s)."


def difference_sentence(comparison: Comparison, arm: str, metric: str, diff: dict) -> str:
    interval = ("one pair, no interval" if math.isnan(diff["low"])
                else f"95% CI {signed(diff['low'])} to {signed(diff['high'])}")
    word = verdict(diff)
    said = {"higher": "higher than the baseline", "lower": "lower than the baseline",
            "no clear difference": "no clear difference", "one pair only: no interval": "a single pair"}[word]
    return (f"*{arm}* changes mean {METRIC_TITLES[metric]} by {signed(diff['mean'])} points ({interval}; "
            f"{diff['n']} pairs by {diff['pairing']}): {said}.")


def results_blocks(ctx: Context) -> list[Block]:
    from experiments.reporting.paper_tables import main_table

    blocks: list[Block] = []
    blocks += ctx.table(main_table(ctx.present))
    for comparison in ctx.comparisons:
        blocks.append(Heading(comparison.title, 2))
        if not (comparison.arms and comparison.others):
            why = "; ".join(f"{arm}: {reason}" for arm, reason in comparison.missing) or "no runs"
            blocks.append(Note(f"Not in these runs: {comparison.title.lower()} ({why})."))
            continue
        if comparison.missing:
            blocks.append(Note("Left out of this comparison: " + "; ".join(f"{a}: {r}" for a, r in comparison.missing)))
        sentences = [difference_sentence(comparison, arm, metric, diff) for arm, metric, diff in paired_rows(comparison)
                     if diff is not None and metric in ("image_auroc", "pixel_auroc")]
        blocks += [text(" ".join(sentences))] if sentences else []
        blocks += ctx.table(summary_table(comparison))
        blocks += ctx.table(paired_table(comparison))
        blocks += ctx.table(category_table(comparison, "image_auroc"))
        if comparison.sweep:
            blocks += ctx.figure(pf.sweep_figure(comparison))
        else:
            blocks += ctx.figure(pf.roc_figure(comparison))
            first = categories_of(comparison)[0]
            blocks += ctx.figure(pf.map_figure(comparison, first))
        if comparison.name == "finetuning" or any(is_finetuned(a.runs[0].config.get("backbone") or {})
                                                                for a in comparison.others):
            blocks += ctx.table(selection_table(comparison))
            blocks += ctx.figure(pf.finetune_figure(comparison))
    gallery = gallery_items(ctx)
    if gallery:
        blocks += [Heading("Anomaly-map gallery", 2),
                   text("The HTML version of this report holds every saved anomaly map of the first seed of each arm "
                        "(test image, ground truth, map), browsable by comparison, category and arm."),
                   Gallery(gallery)]
    return blocks


def gallery_items(ctx: Context) -> list[tuple[str, str, str, str]]:
    """(comparison, arm, category, path relative to the report) of each saved map PNG, copied next to it."""
    import shutil

    items = []
    for comparison in ctx.present:
        for arm in comparison.arms:
            run = min(arm.runs, key=lambda r: (str(r.config.get("seed")), str(r.folder)))
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
        up = sorted({arm for arm, _, diff in rows if verdict(diff) == "higher"})
        down = sorted({arm for arm, _, diff in rows if verdict(diff) == "lower"})
        parts = [f"*{comparison.title}.* The highest mean image AUROC is {best.name}'s "
                 f"({_mean(comparison, best, 'image_auroc'):.1f}%, baseline {base:.1f}%)."]
        if up:
            parts.append(f"Clearly higher than the baseline on at least one metric: {', '.join(up)}.")
        if down:
            parts.append(f"Clearly lower on at least one metric: {', '.join(down)}.")
        if not up and not down:
            n = max((diff["n"] for _, _, diff in rows), default=0)
            parts.append(f"No arm differs clearly from the baseline on image AUROC, pixel AUROC or AUPRO with "
                         f"{n} pairs per difference; a real effect smaller than the intervals cannot be excluded.")
        fits = {arm.name: arm.rows["fit_s"].mean() for arm in comparison.arms}
        base_fit = fits[comparison.baseline.name]
        slow = [f"{name} ({value / base_fit:.1f}x)" for name, value in fits.items()
                if base_fit > 0 and not math.isnan(value) and value >= 1.5 * base_fit]
        if slow:
            parts.append(f"Fit time per category against the baseline's {base_fit:.0f} s: {', '.join(slow)}.")
        blocks.append(text(" ".join(parts)))
    if not blocks:
        blocks.append(Note("No comparison with at least one arm besides the baseline: nothing to discuss."))
    return blocks


def limitations_blocks(ctx: Context) -> list[Block]:
    items = []
    if ctx.dataset == "textures":
        items.append("The embedded textures set has synthetic defects (scratches, holes, colour changes, foreign "
                     "texture) on photographs of four textures: it shows how settings compare on such defects, not "
                     "what they reach on real industrial images such as MVTec AD @mvtec.")
    skipped = [(c.title, a, r) for c in ctx.comparisons for a, r in c.missing]
    if skipped:
        items.append("Arms that could not be run here: " + "; ".join(f"{t} / {a} ({r})" for t, a, r in skipped) + ".")
    seeds = ctx.frame["seed"].nunique()
    if seeds < 3:
        items.append(f"{seeds} seed(s) only: the spreads over seeds and most intervals are missing or wide.")
    items.append("The intervals treat each (seed, category) pair as one observation; categories are few and not "
                 "a sample of all inspection tasks, so the intervals describe these runs, not a population.")
    manifest = ctx.manifest or {}
    if str(manifest.get("study", "")).startswith("quick"):
        items.append("This is the quick smoke study (conf/study/quick.yaml): one seed, two categories, few training "
                     "images and few fine-tuning steps; its numbers check the pipeline and are not results.")
    return [Bullets([text(item).spans for item in items])]


def conclusion_blocks(ctx: Context) -> list[Block]:
    up, down = [], []
    for comparison in ctx.present:
        for arm, metric, diff in paired_rows(comparison):
            if diff is not None and metric == "image_auroc":
                (up if verdict(diff) == "higher" else down if verdict(diff) == "lower" else []).append(
                    f"{arm} ({signed(diff['mean'])})")
    n = len(ctx.present)
    lines = [f"Over {n} comparison(s) on {ctx.dataset} against one baseline:"]
    lines.append(f"clearly higher mean image AUROC: {', '.join(up)}." if up else
                 "no arm clearly raises mean image AUROC over the baseline.")
    if down:
        lines.append(f"Clearly lower: {', '.join(down)}.")
    return [text(" ".join(lines))]


def appendix_blocks(ctx: Context, run_dirs: list[str]) -> list[Block]:
    manifest = ctx.manifest or {}
    blocks: list[Block] = []
    commands = []
    if manifest:
        commands.append(f"# the study ({manifest.get('study')}); re-running it resumes\n{manifest.get('command')}")
    commands.append("# this report\npython experiments/report.py " + " ".join(run_dirs))
    blocks += [text("*Commands.*"), Code("\n".join(commands))]
    versions = []
    for run in ctx.runs:
        shown = ", ".join(f"{k} {v}" for k, v in (run.results.get("versions") or {}).items() if v)
        if shown not in versions:
            versions.append(shown)
    commits = sorted({str(run.results.get("git_commit")) for run in ctx.runs})
    blocks += [text(f"*Versions.* The runs ran from {len(commits)} git commit(s) (a -dirty suffix: with uncommitted "
                    "changes) with these packages:"), Code("\n".join([*commits, *versions]))]
    blocks.append(text("*Where each number comes from.* Every run below is one results.json (config hash in it); "
                       "tables/sources.csv lists, for every number in every table, the results.json files it is "
                       "computed from, and the HTML version shows them on each cell."))
    lines = []
    jobs = {row["folder"]: row for row in manifest.get("jobs", [])}
    for run in sorted(ctx.runs, key=lambda r: str(r.folder)):
        job = next((row for folder, row in jobs.items() if Path(folder).resolve() == run.folder.resolve()), None)
        name = job["id"] if job else run.variant
        lines.append(f"{name}  seed={run.config.get('seed')}  hash={run.key}  {run.folder / 'results.json'}")
        if job:
            lines.append(f"    {job['command']}")
    blocks.append(Code("\n".join(lines)))
    return blocks
