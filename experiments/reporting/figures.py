"""The report's figures (matplotlib, saved as PNG and PDF). Each builder returns ``[Figure]`` for the
studies the runs contain and nothing when they contain none (e.g. no coreset sweep, no coreset figure).

- coreset:    metrics and fit time vs coreset ratio (log x), one line per backbone variant
- layers:     heatmap of image / pixel AUROC, layer set x category, per backbone variant
- cold start: metric vs number of nominal training images, mean over seeds and min-max band
- roc:        ROC curve per category, one curve per variant (from scores.csv)
- maps:       per category: test images, ground truth and each variant's anomaly map
"""

from __future__ import annotations

import csv
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.harness.anomaly_maps import MAPS_DIR, colorize, denormalise, load_maps, pick_indices  # noqa: E402
from experiments.harness.results import METRIC_TITLES  # noqa: E402
from experiments.reporting.data import Run, seed_means  # noqa: E402
from experiments.reporting.pdf import WIDTH as PAGE_WIDTH  # noqa: E402  (figures fill the text width)
from experiments.reporting.variants import label, sort_value  # noqa: E402

CURVE_METRICS = ("image_auroc", "pixel_auroc", "aupro")  # the coreset figure's panels (with fit time)
MAX_CURVES = 6


@dataclass
class Figure:
    name: str        # file stem
    figure: object   # matplotlib Figure
    caption: str


def _group_by(runs: list[Run], key: str) -> dict[str, list[Run]]:
    """Runs grouped by their variant label without ``key``; only groups where ``key`` takes 2+ values."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(label(run.backbone, run.deviations, without=(key,)), []).append(run)
    return {name: group for name, group in groups.items()
            if len({repr(_setting(run, key)) for run in group}) >= 2}


def _setting(run: Run, key: str):
    value = run.config
    for part in key.split("."):
        value = (value or {}).get(part) if isinstance(value, dict) else None
    return value


def coreset_figures(runs: list[Run], frame: pd.DataFrame) -> list[Figure]:
    groups = _group_by(runs, "coreset.ratio")
    if not groups:
        return []
    panels = [*CURVE_METRICS, "fit_s"]
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH, 2.6), constrained_layout=True)
    for name, group in groups.items():
        rows = frame[frame["variant"].isin({run.variant for run in group})]
        categories = sorted(rows["category"].unique())
        ratios = sorted(rows["coreset_ratio"].unique())
        for ax, panel in zip(axes, panels):
            points = [(r, seed_means(rows[rows["coreset_ratio"] == r], panel, categories)) for r in ratios]
            points = [(r, m) for r, m in points if m]
            if not points:
                continue
            scale = 1 if panel == "fit_s" else 100
            ys = [scale * np.mean(m) for _, m in points]
            errs = [scale * np.std(m, ddof=1) if len(m) > 1 else 0.0 for _, m in points]
            ax.errorbar([r for r, _ in points], ys, yerr=errs, marker="o", ms=3, capsize=2, label=name)
    ratios = sorted(frame["coreset_ratio"].dropna().unique())
    for ax, panel in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios], fontsize=6, rotation=45)
        ax.minorticks_off()
        ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.set_xlabel("coreset ratio")
        ax.set_title("fit time (s / category)" if panel == "fit_s" else f"{METRIC_TITLES[panel]} (%)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    caption = ("Mean over categories against the fraction of patches kept in the memory bank (log scale); "
               "fit time = feature extraction + coreset selection per category. Error bars: std over seeds.")
    return [Figure("coreset_ratio", fig, caption)]


def layer_figures(runs: list[Run], frame: pd.DataFrame) -> list[Figure]:
    figures = []
    for index, (name, group) in enumerate(_group_by(runs, "backbone.layers").items()):
        rows = frame[frame["variant"].isin({run.variant for run in group})]
        layer_sets = sorted(rows["layers"].unique(), key=lambda s: (len(s.split("+")), s))
        categories = sorted(rows["category"].unique())
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 0.45 * len(layer_sets) + 1.6), constrained_layout=True)
        for ax, metric in zip(axes, ("image_auroc", "pixel_auroc")):
            grid = np.full((len(layer_sets), len(categories) + 1), np.nan)
            for i, layers in enumerate(layer_sets):
                subset = rows[rows["layers"] == layers]
                for j, category in enumerate(categories):
                    values = subset.loc[subset["category"] == category, metric].dropna()
                    grid[i, j] = 100 * values.mean() if len(values) else np.nan
                per_seed = seed_means(subset, metric, categories)
                grid[i, -1] = 100 * np.mean(per_seed) if per_seed else np.nan
            image = ax.imshow(grid, cmap="viridis", aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if value < np.nanmean(grid) else "black")
            ax.set_xticks(range(len(categories) + 1), [*categories, "mean"], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(layer_sets)), layer_sets, fontsize=7)
            ax.set_title(f"{METRIC_TITLES[metric]} (%)", fontsize=9)
            fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"Layer sweep: {name}", fontsize=10)
        caption = f"Feature layers of {name} (rows) against category; the last column is the mean over categories."
        figures.append(Figure(f"layers_{index}", fig, caption))
    return figures


def cold_start_figures(runs: list[Run], frame: pd.DataFrame) -> list[Figure]:
    groups = _group_by(runs, "dataset.train_limit")
    if not groups:
        return []
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(PAGE_WIDTH, 2.8), constrained_layout=True)
    ticks: dict[float, str] = {}
    for name, group in groups.items():
        rows = frame[frame["variant"].isin({run.variant for run in group})]
        categories = sorted(rows["category"].unique())
        limits = rows["train_limit"].dropna().unique().tolist() + ([None] if rows["train_limit"].isna().any() else [])
        for ax, metric in zip(axes, CURVE_METRICS):
            points = []
            for limit in limits:
                subset = rows[rows["train_limit"].isna()] if limit is None else rows[rows["train_limit"] == limit]
                means = seed_means(subset, metric, categories)
                if not means:
                    continue
                x = float(subset["n_train"].mean())  # "all" sits at the real training-set size
                ticks[x] = f"all ({x:.0f})" if limit is None else f"{x:.0f}"
                points.append((x, 100 * np.mean(means), 100 * np.min(means), 100 * np.max(means)))
            if points:
                xs, ys, lows, highs = zip(*sorted(points))
                line = ax.plot(xs, ys, marker="o", ms=3, label=name)[0]
                ax.fill_between(xs, lows, highs, alpha=0.2, color=line.get_color())
    for ax, metric in zip(axes, CURVE_METRICS):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ticks), list(ticks.values()), fontsize=6, rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("nominal training images")
        ax.set_title(f"{METRIC_TITLES[metric]} (%)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    caption = ("Cold start: mean over categories against the number of nominal training images "
               "(dataset.train_limit, a seeded random subset); line = mean over seeds, band = min to max over seeds.")
    return [Figure("cold_start", fig, caption)]


def _read_scores(run: Run, category: str) -> tuple[np.ndarray, np.ndarray] | None:
    path = run.folder / "scores.csv"
    if not path.is_file():
        return None
    with path.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["category"] == category]
    if not rows:
        return None
    return (np.array([int(row["label"]) for row in rows]), np.array([float(row["image_score"]) for row in rows]))


def pick_variants(runs: list[Run], variants: list[str], limit: int = MAX_CURVES) -> list[str]:
    """At most ``limit`` variants, those closest to their backbone's defaults first (``variants`` order kept)."""
    deviations = {run.variant: len(run.deviations) for run in runs}
    chosen = sorted(variants, key=lambda v: (deviations.get(v, 99), variants.index(v)))[:limit]
    return [v for v in variants if v in chosen]


def _first_seed_run(runs: list[Run], variant: str, category: str) -> Run | None:
    candidates = [r for r in runs if r.variant == variant and category in (r.results.get("categories") or {})]
    return min(candidates, key=lambda r: (sort_value(r.config.get("seed")), str(r.folder))) if candidates else None


def roc_figures(runs: list[Run], frame: pd.DataFrame, variants: list[str]) -> list[Figure]:
    from sklearn.metrics import roc_curve

    categories = sorted(frame["category"].unique())
    shown = pick_variants(runs, variants)
    if not categories or not shown:
        return []
    ncols = min(4, len(categories))
    nrows = math.ceil(len(categories) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH, 2.0 * nrows + 0.8), squeeze=False,
                             constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for ax, category in zip(axes.flat, categories):
        for k, variant in enumerate(shown):
            run = _first_seed_run(runs, variant, category)
            scores = _read_scores(run, category) if run else None
            if scores is None or len(set(scores[0])) < 2:
                continue
            fpr, tpr, _ = roc_curve(*scores)
            ax.plot(fpr, tpr, color=colors[k % len(colors)], lw=1.2, label=variant)
            drawn = True
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.6, ls="--")
        ax.set_title(category, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(categories):]:
        ax.axis("off")
    if not drawn:
        plt.close(fig)
        return []
    for ax in axes[-1]:
        ax.set_xlabel("false positive rate", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate", fontsize=7)
    _legend(fig, axes.flat[0])
    caption = ("Image-level ROC curves per category from scores.csv (first seed of each variant"
               + (f"; the {len(shown)} variants closest to their defaults" if len(shown) < len(variants) else "")
               + ").")
    return [Figure("roc", fig, caption)]


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
                        "label": int(predictions.labels[k]), "score": float(predictions.image_scores[k]),
                        "path": predictions.paths[k], "defect_type": predictions.defect_types[k],
                        "vmin": float(predictions.maps.min()), "vmax": float(predictions.maps.max())})
    return records


def map_figures(runs: list[Run], frame: pd.DataFrame, variants: list[str], max_images: int = 4) -> list[Figure]:
    figures = []
    shown = pick_variants(runs, variants)
    for category in sorted(frame["category"].unique()):
        per_variant: dict[str, dict[str, dict]] = {}
        paths: list[str] | None = None
        for variant in shown:
            run = _first_seed_run(runs, variant, category)
            if run is None:
                continue
            records = _maps_for(run, category, paths)
            if records:
                per_variant[variant] = {r["path"]: r for r in records}
                paths = paths or [r["path"] for r in records][:max_images]
        if not per_variant or not paths:
            continue
        columns = ["image", "ground truth", *per_variant]
        fig, axes = plt.subplots(len(paths), len(columns), squeeze=False, constrained_layout=True,
                                 figsize=(PAGE_WIDTH, PAGE_WIDTH / len(columns) * len(paths) + 0.6))
        for i, path in enumerate(paths):
            base = next((v[path] for v in per_variant.values() if path in v), None)
            for j, column in enumerate(columns):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    width = max(12, int(90 / len(columns)))
                    ax.set_title(textwrap.fill(column, width, break_long_words=False), fontsize=6)
                if column == "image":
                    ax.imshow(base["image"])
                    ax.set_ylabel(f"{base['defect_type']}\n{Path(path).stem}", fontsize=6)
                elif column == "ground truth":
                    ax.imshow(base["mask"], cmap="gray", vmin=0, vmax=1)
                elif path in per_variant[column]:
                    record = per_variant[column][path]
                    ax.imshow(colorize(record["map"], record["vmin"], record["vmax"]))
                    ax.set_xlabel(f"score {record['score']:.2f}", fontsize=6)
                else:
                    ax.axis("off")
        fig.suptitle(f"Anomaly maps: {category}", fontsize=10)
        caption = (f"{category}: test images, ground truth and each variant's anomaly map (inferno; each map "
                   "scaled to the range of its run's maps over the whole test set, so colours compare within a "
                   "column); below each map its image score.")
        figures.append(Figure(f"maps_{category}", fig, caption))
    return figures


def _legend(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=7, frameon=False)


def save(figure: Figure, folder: Path, dpi: int = 150) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{figure.name}.png", folder / f"{figure.name}.pdf"
    figure.figure.savefig(png, dpi=dpi)
    figure.figure.savefig(pdf)
    plt.close(figure.figure)
    return png, pdf
