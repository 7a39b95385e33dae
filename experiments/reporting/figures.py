"""The report's figures (matplotlib, saved as PNG and PDF), per comparison: sweep curves (metric against the
swept value, the baseline at its own value), ROC curves and anomaly-map grids of the same test images under
each arm, and fine-tuning curves (per step: loss, task accuracy and every other monitored quantity in the
checkpoints' ``.loss.jsonl`` / ``.proxy.jsonl`` logs). The run digest draws the ROC curves and map grids over
its variants and shares the paper's sweep figures. A builder returns nothing when there is nothing to draw.
"""

from __future__ import annotations

import csv
import dataclasses
import json
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
from experiments.reporting.comparisons import Comparison, categories_of, setting  # noqa: E402
from experiments.reporting.data import Run, seed_means  # noqa: E402
from experiments.reporting.stats import mean_std  # noqa: E402
from experiments.reporting.variants import sort_value  # noqa: E402

PAGE_WIDTH = 6.3  # inches: the A4 text width of the Typst layout
CURVES = ("image_auroc", "pixel_auroc", "aupro")
MAX_CURVES = 6




@dataclass
class Figure:
    name: str        # file stem
    figure: object   # matplotlib Figure
    caption: str


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


def save(figure: Figure, folder: Path, dpi: int = 130) -> str:
    """Write the PNG and the PDF; returns the PNG's path relative to the report folder (``folder``'s parent)."""
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{figure.name}.png"
    figure.figure.savefig(png, dpi=dpi)
    figure.figure.savefig(folder / f"{figure.name}.pdf")
    plt.close(figure.figure)
    return f"{folder.name}/{png.name}"


LOG_SKIP = {"step", "epoch", "time_s", "lr_backbone", "lr_head"}


def sweep_figure(comparison: Comparison) -> list[Figure]:
    """Mean over categories (each seed's first) against the swept value; error bars: std over seeds."""
    if not comparison.sweep or not comparison.others:
        return []
    key, categories = comparison.sweep, categories_of(comparison)
    points = []  # (x value, label, arm, rows)
    for arm in comparison.arms:
        value = setting(arm.runs[0].config, key)
        if key == "dataset.train_limit":
            x = float(arm.rows["n_train"].mean())
            label = f"all ({x:.0f})" if value is None else f"{x:.0f}"
        else:
            x, label = value, (f"{value:g}" if isinstance(value, float) else
                               "+".join(map(str, value)) if isinstance(value, list) else str(value))
        points.append((x, label, arm))
    numeric = all(isinstance(p[0], (int, float)) and not isinstance(p[0], bool) for p in points)
    points.sort(key=lambda p: p[0] if numeric else p[1])
    if not numeric:  # layer sets: in the order of the number of layers, then by name
        points.sort(key=lambda p: (len(p[1].split("+")), p[1]))
    panels = [*CURVES, "fit_s"]
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH, 2.2), constrained_layout=True)
    for ax, panel in zip(axes, panels):
        xs, ys, errs = [], [], []
        for i, (x, _, arm) in enumerate(points):
            scale = 1 if panel == "fit_s" else 100
            mean, std, n = mean_std([scale * m for m in seed_means(arm.rows, panel, categories)])
            if not n:
                continue
            xs.append(x if numeric else i)
            ys.append(mean)
            errs.append(0.0 if math.isnan(std) else std)
        ax.errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, lw=1)
        base = next((k for k, p in enumerate(points) if p[2] is comparison.baseline), None)
        if base is not None and xs:
            bx = points[base][0] if numeric else base
            if bx in xs:
                ax.plot([bx], [ys[xs.index(bx)]], marker="*", ms=9, color="tab:red", ls="none", label="baseline")
        if numeric:
            positive = all(p[0] > 0 for p in points)
            spread = max(p[0] for p in points) / max(min(p[0] for p in points), 1e-12) if positive else 1
            if positive and spread >= 8:
                ax.set_xscale("log", base=2 if key == "dataset.train_limit" else 10)
                ax.minorticks_off()
            ax.set_xticks([p[0] for p in points], [p[1] for p in points], fontsize=6, rotation=45)
        else:
            ax.set_xticks(range(len(points)), [p[1] for p in points], fontsize=6, rotation=45, ha="right")
        ax.set_title("fit time (s / category)" if panel == "fit_s" else f"{METRIC_TITLES[panel]} (%)", fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel(key, fontsize=7)
    caption = (f"{comparison.title}: the mean over categories against {key} (the red star: the baseline); "
               "error bars: sample std over seeds; fit time = feature extraction + coreset selection.")
    return [Figure(f"sweep_{comparison.name}", fig, caption)]


def _by_arm(comparison: Comparison) -> tuple[list, pd.DataFrame, list[str]]:
    """Copies of the comparison's runs and rows labelled by arm name (the figures' legends and columns)."""
    runs = [dataclasses.replace(run, variant=arm.name) for arm in comparison.arms for run in arm.runs]
    rows = pd.concat([arm.rows.assign(variant=arm.name) for arm in comparison.arms], ignore_index=True)
    return runs, rows, [arm.name for arm in comparison.arms]


def roc_figure(comparison: Comparison) -> list[Figure]:
    runs, rows, arms = _by_arm(comparison)
    built = roc_figures(runs, rows, arms)
    for figure in built:
        figure.name = f"roc_{comparison.name}"
        figure.caption = f"{comparison.title}: {figure.caption[0].lower()}{figure.caption[1:]}"
    return built


def map_figure(comparison: Comparison, category: str, images: int = 3) -> list[Figure]:
    runs, rows, arms = _by_arm(comparison)
    built = map_figures(runs, rows[rows["category"] == category], arms, max_images=images)
    for figure in built:
        figure.name = f"maps_{comparison.name}_{category}"
        figure.caption = f"{comparison.title}: {figure.caption}"
    return built


LOGS = {"loss": ("loss.jsonl", "every training step's loss, task loss, L2-SP term and accuracy"),
        "proxy": ("proxy.jsonl", "every proxy evaluation (held-out nominal images with synthetic anomalies): the "
                                 "proxy score and AUROCs that select the checkpoint, and the collapse monitors "
                                 "(effective rank, nearest-neighbour distances, weight distance)")}


def checkpoint_logs(comparison: Comparison, kind: str) -> dict[str, list[tuple[str, Path]]]:
    """Per arm, (category, log file) of its first seed's fine-tuned checkpoints (``kind``: loss | proxy)."""
    logs: dict[str, list[tuple[str, Path]]] = {}
    for arm in comparison.others:
        run = min(arm.runs, key=lambda r: (str(r.config.get("seed")), str(r.folder)))
        checkpoint = setting(run.config, "backbone.checkpoint")
        if not checkpoint:
            continue
        folder = Path(str(checkpoint)).parent
        for category in sorted(run.results.get("categories") or {}):
            path = folder / f"{category}.{LOGS[kind][0]}"
            if path.is_file():
                logs.setdefault(arm.name, []).append((category, path))
    return logs


def read_log(path: Path) -> pd.DataFrame:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return pd.DataFrame(rows)


def _step_panels(frames: dict[str, pd.DataFrame]) -> tuple | None:
    """A grid with one panel per numeric logged quantity against the step, one line per category."""
    keys = [k for k in dict.fromkeys(k for f in frames.values() for k in f.columns)
            if k not in LOG_SKIP and not k.endswith("_time_s")
            and all(pd.api.types.is_numeric_dtype(f[k]) and not pd.api.types.is_bool_dtype(f[k])
                    for f in frames.values() if k in f)]
    if not keys:
        return None
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH, 1.7 * nrows + 0.5), squeeze=False,
                             constrained_layout=True)
    for ax, key in zip(axes.flat, keys):
        for category, log in frames.items():
            if key in log and "step" in log:
                ax.plot(log["step"], log[key], lw=1, marker="." if len(log) < 20 else None, label=category)
        ax.set_title(key, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=7, frameon=False)
    return fig


def finetune_figure(comparison: Comparison) -> list[Figure]:
    """Per fine-tuning method: the training log, then the proxy-selection log (when the checkpoints have one)."""
    built = []
    for kind, (suffix, what) in LOGS.items():
        for arm, logs in checkpoint_logs(comparison, kind).items():
            fig = _step_panels({category: read_log(path) for category, path in logs})
            if fig is not None:
                caption = (f"Fine-tuning of {arm} (first seed), per category against the step: {what} "
                           f"(<category>.{suffix}).")
                built.append(Figure(f"finetune_{kind}_{arm}", fig, caption))
    return built


