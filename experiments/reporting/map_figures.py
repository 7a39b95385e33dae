"""Anomaly-map grids: a few test images, their ground truth (where the dataset has masks) and each group's
anomaly map of the same images, from the runs' saved maps (or a saved model re-run).

One colour scale for the whole grid: each run's maps and image scores are divided by the highest image score
among that run's nominal test images (its scores.csv), so 1 means "as anomalous as the most anomalous-looking
nominal test image" in every column, whatever the arm's units (distances, squared distances, reconstruction
errors); the colour bar shows that scale. A run without scores.csv is scaled by its largest map value over the
test set instead, and the caption says which runs were. The test labels pick the scale's reference and, in the
paper, the categories shown (the baseline's hardest): display only, no setting is chosen by them.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from experiments.harness.anomaly_maps import MAPS_DIR, denormalise, load_maps, pick_indices
from experiments.reporting.comparisons import Comparison, categories_of
from experiments.reporting.data import Run, seed_means
from experiments.reporting.figures import PAGE_WIDTH, Figure, Groups, _on, pick, plt  # (Agg set there)
from experiments.reporting.intervals import image_scores
from experiments.reporting.wording import breakable

CMAP = "inferno"
PANEL = 1.1  # inches: the largest side of one image in a grid (a grid of few columns stays short)
SHOWN_CATEGORIES = 2  # the paper's grids: the categories where the baseline's image AUROC is lowest
NOMINAL = "the highest image score among its run's nominal test images"


def hardest(comparison: Comparison, n: int = SHOWN_CATEGORIES) -> list[str]:
    """The ``n`` categories with the lowest mean image AUROC of the baseline (ties by name): where maps differ,
    unlike a category every arm separates perfectly."""
    aurocs = {c: np.mean(seed_means(comparison.baseline.rows, "image_auroc", [c]) or [math.inf])
              for c in categories_of(comparison)}
    return sorted(aurocs, key=lambda c: (aurocs[c], c))[:n]


def reference(run: Run, category: str, records: list[dict]) -> tuple[float, bool]:
    """(the value a run's maps and scores are divided by, whether it is NOMINAL (else its maps' maximum))."""
    scores = image_scores(run.folder, category) or {}
    nominal = [score for label, score in scores.values() if label == 0 and np.isfinite(score)]
    if nominal and max(nominal) > 0:
        return float(max(nominal)), True
    top = max((float(r["vmax"]) for r in records), default=1.0)
    return (top if top > 0 else 1.0), False


def _maps_for(run: Run, category: str, paths: list[str] | None) -> list[dict]:
    """Saved maps of one run and category, or (no maps, a saved model) maps made by re-running the model."""
    records = load_maps(run.folder / MAPS_DIR / category)
    if records or not (run.folder / "models" / category / "model.json").is_file():
        return records
    return rerun_saved_model(run, category, paths)


def rerun_saved_model(run: Run, category: str, paths: list[str] | None, n: int = 4) -> list[dict]:
    """Anomaly maps of a few test images from ``models/<category>`` (when the run saved no maps)."""
    import warnings

    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, Subset

    from core.data import Preprocessing
    from core.patchcore import PatchCore

    try:
        model = PatchCore.load(run.folder / "models" / category, progress=False)
        preprocessing = Preprocessing(**model.metadata["preprocessing"])
        dataset = instantiate(run.config["dataset"]).test_set(category, preprocessing)
    except Exception as error:  # weights or data not on this machine: the grid goes without this run
        warnings.warn(f"could not re-run the saved model of {run.folder} / {category}: {error}", stacklevel=2)
        return []
    samples = dataset.samples
    all_paths = [str(s.path) for s in samples]
    if paths:
        indices = [all_paths.index(p) for p in paths if p in all_paths]
    else:
        indices = pick_indices([s.label for s in samples], [s.defect_type for s in samples], all_paths, n)
    predictions = model.predict(DataLoader(Subset(dataset, indices), batch_size=4))
    records = []
    for k, i in enumerate(indices):
        records.append({"image": denormalise(dataset[i]["image"], preprocessing.mean, preprocessing.std),
                        "map": predictions.maps[k], "mask": predictions.masks[k].astype(np.uint8),
                        "has_mask": bool(predictions.has_mask[k]),
                        "label": int(predictions.labels[k]), "score": float(predictions.image_scores[k]),
                        "path": predictions.paths[k], "defect_type": predictions.defect_types[k],
                        "vmin": float(predictions.maps.min()), "vmax": float(predictions.maps.max())})
    return records


def _shown(records: list[dict], max_images: int) -> list[str]:
    """The paths of up to ``max_images`` saved images: anomalous ones first, and one nominal image when there
    is one (saved maps list anomalous images first), as a reference for the scale."""
    anomalous = [r["path"] for r in records if int(r["label"]) == 1]
    nominal = [r["path"] for r in records if int(r["label"]) != 1]
    chosen = anomalous[:max_images - (1 if nominal and max_images > 1 else 0)]
    return [*chosen, *nominal[:max_images - len(chosen)]]


def _collect(groups: Groups, category: str, max_images: int) -> tuple[list[str], dict[str, dict], list[str]]:
    """(the images shown, group -> {path: record scaled by its run's reference}, groups scaled by their maps)."""
    per_group: dict[str, dict] = {}
    paths: list[str] = []
    by_maps = []
    for label, runs in pick(groups):
        run = _on(runs, category)
        records = _maps_for(run, category, paths or None) if run else []
        if not records:
            continue
        scale, nominal = reference(run, category, records)
        by_maps += [] if nominal else [label]
        per_group[label] = {r["path"]: {**r, "map": np.asarray(r["map"], np.float32) / scale,
                                        "score": float(r["score"]) / scale} for r in records}
        paths = paths or _shown(records, max_images)
    return paths, per_group, by_maps


def scale_words(by_maps: list[str]) -> str:
    """How the grid's maps and scores were scaled, for its caption."""
    said = (f"maps and image scores divided by {NOMINAL} (colour bar; 1 = as high as the most anomalous-looking "
            "nominal test image, the white line)")
    if by_maps:
        said += f"; without scores.csv, by the largest value of its maps over the test set: {', '.join(by_maps)}"
    return said


def map_figures(groups: Groups, categories: list[str], prefix: str = "maps", title: str = "",
                max_images: int = 4) -> list[Figure]:
    """Per category: a few test images, their ground truth and each group's anomaly map (first seed)."""
    figures = []
    for category in categories:
        paths, per_group, by_maps = _collect(groups, category, max_images)
        if per_group and paths:
            caption = (f"{category}: test images, ground truth (where the dataset has masks) and each variant's "
                       f"anomaly map (first seed); {scale_words(by_maps)}; below each map its scaled image score.")
            grid = map_grid([(category, p) for p in paths], per_group, not by_maps)
            figures.append(Figure(f"{prefix}_{category}", grid, f"{title}: {caption}" if title else caption,
                                  share(grid)))
    return figures


def gallery_figure(comparison: Comparison, groups: Groups, name: str, max_images: int = 2) -> list[Figure]:
    """One grid for a comparison: ``max_images`` test images of each of its SHOWN_CATEGORIES hardest categories
    (``hardest``), every arm's map of them on one colour scale."""
    rows, per_group, by_maps = [], {}, []
    categories = hardest(comparison)
    for category in categories:
        paths, found, scaled_by_maps = _collect(groups, category, max_images)
        rows += [(category, path) for path in paths]
        for label, records in found.items():
            per_group.setdefault(label, {}).update(records)
        by_maps += [f"{label} ({category})" for label in scaled_by_maps]
    if not rows:
        return []
    which = (f"the {len(categories)} categories where the baseline's image AUROC is lowest" if len(categories) > 1
             else "the category where the baseline's image AUROC is lowest")
    caption = (f"{comparison.title}: anomaly maps of the same test images under each arm (first seed), from {which} "
               f"(chosen for display only); ground truth where the dataset has masks; {scale_words(by_maps)}; "
               "below each map its scaled image score.")
    grid = map_grid(rows, per_group, not by_maps)
    return [Figure(name, grid, caption, share(grid))]


def share(fig) -> float:
    """A grid's share of the text width: its own width at the size it was drawn."""
    return min(1.0, round(fig.get_figwidth() / PAGE_WIDTH, 2))


def map_grid(rows: list[tuple[str, str]], per_group: dict[str, dict[str, dict]], nominal: bool = True):
    """Rows of (category, test image path): the image, its ground truth (a column only when some image has a
    mask) and each group's scaled map on one colour scale, with a colour bar (``nominal``: every run scaled by
    NOMINAL, else some by their maps' maximum)."""
    records = [v[path] for _, path in rows for v in per_group.values() if path in v]
    masks = any(bool(r.get("has_mask", np.any(r["mask"]))) for r in records)
    columns = ["image", *(["ground truth"] if masks else []), *per_group]
    top = max(1.25, math.ceil(2 * max(float(np.max(r["map"])) for r in records)) / 2)
    side = min((PAGE_WIDTH - 0.6) / len(columns), PANEL)  # 0.6 in: the colour bar
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False, constrained_layout=True,
                             figsize=(side * len(columns) + 0.6, side * len(rows) + 0.35))
    image = None
    for i, (category, path) in enumerate(rows):
        base = next(v[path] for v in per_group.values() if path in v)
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                # break what is still too long once a candidate's name has its spaces
                ax.set_title(textwrap.fill(breakable(column), max(12, int(90 / len(columns)))), fontsize=6)
            if column == "image":
                ax.imshow(base["image"])
                ax.set_ylabel(f"{category}\n{base['defect_type']}\n{Path(path).stem}", fontsize=5.5)
            elif column == "ground truth":
                ax.imshow(base["mask"], cmap="gray", vmin=0, vmax=1)
            elif path in per_group[column]:
                record = per_group[column][path]
                image = ax.imshow(record["map"], cmap=CMAP, vmin=0, vmax=top)
                ax.set_xlabel(f"score {record['score']:.2f}", fontsize=6)
            else:
                ax.axis("off")
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.9, aspect=30, pad=0.01)
        bar.ax.axhline(1.0, color="white", lw=1)
        bar.ax.tick_params(labelsize=6)
        bar.set_label("map / highest nominal image score" if nominal else "map / its run's reference (caption)",
                      fontsize=6)
    return fig
