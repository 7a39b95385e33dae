"""The report's figures (matplotlib, saved as PNG and PDF), each drawn over groups of runs (a comparison's
arms, or the run digest's variants): ROC curves and anomaly-map grids of the same test images under each group,
sweep curves (metric against the swept value, the baseline at its own value) and fine-tuning curves (per step:
loss, task accuracy and every other monitored quantity in the checkpoints' ``.loss.jsonl`` / ``.proxy.jsonl``
logs). A builder returns nothing when there is nothing to draw.
"""

from __future__ import annotations

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
from experiments.reporting.comparisons import Comparison, categories_of, format_value  # noqa: E402
from experiments.reporting.data import Run, first_run, read_log, seed_means, setting, sidecars  # noqa: E402
from experiments.reporting.intervals import image_scores  # noqa: E402
from experiments.reporting.stats import mean_std  # noqa: E402

PAGE_WIDTH = 6.3  # inches: the A4 text width of the Typst layout
CURVES = ("image_auroc", "pixel_auroc", "aupro")
MAX_CURVES = 6
LOG_SKIP = {"step", "epoch", "time_s", "lr_backbone", "lr_head"}
Groups = list[tuple[str, list[Run]]]  # (label, its runs): a comparison's arms or the digest's variants


@dataclass
class Figure:
    name: str        # file stem
    figure: object   # matplotlib Figure
    caption: str


def save(figure: Figure, folder: Path, dpi: int = 130) -> str:
    """Write the PNG and the PDF; returns the PNG's path relative to the report folder (``folder``'s parent)."""
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{figure.name}.png"
    figure.figure.savefig(png, dpi=dpi)
    figure.figure.savefig(folder / f"{figure.name}.pdf")
    plt.close(figure.figure)
    return f"{folder.name}/{png.name}"


def arms(comparison: Comparison) -> Groups:
    return [(arm.name, arm.runs) for arm in comparison.arms]


def pick(groups: Groups, limit: int = MAX_CURVES) -> Groups:
    """At most ``limit`` groups, those closest to their backbone's defaults first (the order kept)."""
    chosen = sorted(range(len(groups)), key=lambda i: (len(groups[i][1][0].deviations), i))[:limit]
    return [group for i, group in enumerate(groups) if i in chosen]


def _on(runs: list[Run], category: str) -> Run | None:
    """The first seed's run of ``category``."""
    found = [run for run in runs if category in (run.results.get("categories") or {})]
    return first_run(found) if found else None


def _grid(n: int, height: float, pad: float) -> tuple:
    """A figure of ``n`` panels, four to a row, ``height`` inches per row (+ ``pad``); unused panels blank."""
    ncols, nrows = min(4, n), math.ceil(n / min(4, n))
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH, height * nrows + pad), squeeze=False,
                             constrained_layout=True)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def _legend(fig, ax, ncols: int = 3) -> None:
    """Below the panels, in as many columns as the longest label leaves room for (7 pt text: about 18
    characters per inch, plus the line sample), so no label runs off the figure's edge."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fits = max(1, int(fig.get_figwidth() * 18 // (max(len(label) for label in labels) + 8)))
        fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels), fits), fontsize=7,
                   frameon=False)


def _read_scores(run: Run, category: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, image scores) of the images of the main metrics, read as the intervals read them (ELPV's
    uncertain cells have their own AUROCs), so a curve matches its reported AUROC."""
    scores = image_scores(run.folder, category)
    if not scores:
        return None
    labels, values = zip(*scores.values())
    return np.array(labels), np.array(values)


def roc_figure(groups: Groups, categories: list[str], name: str = "roc", title: str = "") -> list[Figure]:
    """Image-level ROC curves per category from each group's first seed's scores.csv."""
    from sklearn.metrics import roc_curve

    shown = pick(groups)
    if not categories or not shown:
        return []
    fig, axes = _grid(len(categories), 2.0, 0.8)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for ax, category in zip(axes.flat, categories):
        for k, (label, runs) in enumerate(shown):
            run = _on(runs, category)
            scores = _read_scores(run, category) if run else None
            if scores is None or len(set(scores[0])) < 2:
                continue
            fpr, tpr, _ = roc_curve(*scores)
            ax.plot(fpr, tpr, color=colors[k % len(colors)], lw=1.2, label=label)
            drawn = True
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.6, ls="--")
        ax.set_title(category, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
    if not drawn:
        plt.close(fig)
        return []
    for ax in axes[-1]:
        ax.set_xlabel("false positive rate", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate", fontsize=7)
    _legend(fig, axes.flat[0])
    caption = ("mage-level ROC curves per category from scores.csv (first seed of each variant"
               + (f"; the {len(shown)} variants closest to their defaults" if len(shown) < len(groups) else "") + ").")
    return [Figure(name, fig, f"{title}: i{caption}" if title else f"I{caption}")]


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


def map_figures(groups: Groups, categories: list[str], prefix: str = "maps", title: str = "",
                max_images: int = 4) -> list[Figure]:
    """Per category: a few test images, their ground truth and each group's anomaly map (first seed)."""
    figures = []
    for category in categories:
        per_group: dict[str, dict[str, dict]] = {}
        paths: list[str] | None = None
        for label, runs in pick(groups):
            run = _on(runs, category)
            records = _maps_for(run, category, paths) if run else []
            if records:
                per_group[label] = {r["path"]: r for r in records}
                paths = paths or [r["path"] for r in records][:max_images]
        if per_group and paths:
            caption = (f"{category}: test images, ground truth and each variant's anomaly map (inferno; each map "
                       "scaled to the range of its run's maps over the whole test set, so colours compare within a "
                       "column); below each map its image score.")
            figures.append(Figure(f"{prefix}_{category}", _map_grid(category, paths, per_group),
                                  f"{title}: {caption}" if title else caption))
    return figures


def _map_grid(category: str, paths: list[str], per_group: dict[str, dict[str, dict]]):
    columns = ["image", "ground truth", *per_group]
    fig, axes = plt.subplots(len(paths), len(columns), squeeze=False, constrained_layout=True,
                             figsize=(PAGE_WIDTH, PAGE_WIDTH / len(columns) * len(paths) + 0.6))
    for i, path in enumerate(paths):
        base = next((v[path] for v in per_group.values() if path in v), None)
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
            elif path in per_group[column]:
                record = per_group[column][path]
                ax.imshow(colorize(record["map"], record["vmin"], record["vmax"]))
                ax.set_xlabel(f"score {record['score']:.2f}", fontsize=6)
            else:
                ax.axis("off")
    fig.suptitle(f"Anomaly maps: {category}", fontsize=10)
    return fig


def curves_figure(comparison: Comparison) -> list[Figure]:
    """A sweep whose values come from study.json (``Comparison.points``: fine-tuning steps): one curve per series
    (method) through the baseline at its value (step 0), the mean over categories against the value; error bars:
    std over seeds."""
    key, categories = comparison.sweep, categories_of(comparison)
    by_name = {arm.name: arm for arm in comparison.arms}
    series: dict[str, list[tuple[float, object]]] = {}
    for name, (label, value) in comparison.points.items():
        if name != comparison.baseline.name and name in by_name:
            series.setdefault(label, []).append((float(value), by_name[name]))
    base_x = float(comparison.points.get(comparison.baseline.name, (None, 0))[1])
    xs = sorted({base_x, *(x for points in series.values() for x, _ in points)})
    fig, axes = plt.subplots(1, len(CURVES) + 1, figsize=(PAGE_WIDTH, 2.4), constrained_layout=True)
    for ax, panel in zip(axes, [*CURVES, "fit_s"]):
        scale = 1 if panel == "fit_s" else 100
        for label, points in series.items():
            drawn = [(x, *mean_std([scale * m for m in seed_means(arm.rows, panel, categories)]))
                     for x, arm in sorted([(base_x, comparison.baseline), *points], key=lambda p: p[0])]
            drawn = [(x, mean, 0.0 if math.isnan(std) else std) for x, mean, std, n in drawn if n]
            if drawn:
                ax.errorbar([d[0] for d in drawn], [d[1] for d in drawn], yerr=[d[2] for d in drawn], marker="o",
                            ms=3, capsize=2, lw=1, label=label)
        base = mean_std([scale * m for m in seed_means(comparison.baseline.rows, panel, categories)])
        if base[2]:
            ax.plot([base_x], [base[0]], marker="*", ms=9, color="tab:red", ls="none", label="baseline")
        if len(xs) > 2 and min(x for x in xs if x > 0) * 8 <= max(xs):
            ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
            ax.minorticks_off()
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=6, rotation=45)
        ax.set_title("fit time (s / category)" if panel == "fit_s" else f"{METRIC_TITLES[panel]} (%)", fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel(key, fontsize=7)
    _legend(fig, axes.flat[0], ncols=4)
    caption = (f"{comparison.title}: the mean over categories against {key}, one curve per method through the "
               "baseline (the red star: no fine-tuning); error bars: sample std over seeds; a panel without a curve "
               "has no values (no pixel metrics on this dataset).")
    return [Figure(f"sweep_{comparison.name}", fig, caption)]


def sweep_figure(comparison: Comparison) -> list[Figure]:
    """Mean over categories (each seed's first) against the swept value; error bars: std over seeds."""
    if not comparison.sweep or not comparison.others:
        return []
    if comparison.points:
        return curves_figure(comparison)
    key, categories, points = comparison.sweep, categories_of(comparison), []  # (x value, its label, arm)
    for arm in comparison.arms:
        value = setting(arm.runs[0].config, key)
        if key == "dataset.train_limit":  # the number of images the runs had
            x = float(arm.rows["n_train"].mean())
            points.append((x, f"all ({x:.0f})" if value is None else f"{x:.0f}", arm))
        else:
            points.append((value, format_value(key, value), arm))
    numeric = all(isinstance(p[0], (int, float)) and not isinstance(p[0], bool) for p in points)
    # layer sets: in the order of the number of layers, then by name
    points.sort(key=lambda p: p[0] if numeric else (len(p[1].split("+")), p[1]))
    xs = [p[0] for p in points] if numeric else list(range(len(points)))
    fig, axes = plt.subplots(1, len(CURVES) + 1, figsize=(PAGE_WIDTH, 2.2), constrained_layout=True)
    for ax, panel in zip(axes, [*CURVES, "fit_s"]):
        drawn = [(x, *mean_std([(1 if panel == "fit_s" else 100) * m for m in seed_means(arm.rows, panel, categories)]),
                  arm) for x, (_, _, arm) in zip(xs, points)]
        drawn = [(x, mean, 0.0 if math.isnan(std) else std, arm) for x, mean, std, n, arm in drawn if n]
        ax.errorbar([d[0] for d in drawn], [d[1] for d in drawn], yerr=[d[2] for d in drawn], marker="o", ms=3,
                    capsize=2, lw=1)
        for x, mean, _, arm in drawn:
            if arm is comparison.baseline:
                ax.plot([x], [mean], marker="*", ms=9, color="tab:red", ls="none", label="baseline")
        if numeric and all(x > 0 for x in xs) and max(xs) / max(min(xs), 1e-12) >= 8:
            ax.set_xscale("log", base=2 if key == "dataset.train_limit" else 10)
            ax.minorticks_off()
        ax.set_xticks(xs, [p[1] for p in points], fontsize=6, rotation=45, **({} if numeric else {"ha": "right"}))
        ax.set_title("fit time (s / category)" if panel == "fit_s" else f"{METRIC_TITLES[panel]} (%)", fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel(key, fontsize=7)
    caption = (f"{comparison.title}: the mean over categories against {key} (the red star: the baseline); "
               "error bars: sample std over seeds; fit time = feature extraction + coreset selection.")
    return [Figure(f"sweep_{comparison.name}", fig, caption)]


LOGS = {"loss": ("loss.jsonl", "every training step's loss, task loss, L2-SP term and accuracy"),
        "proxy": ("proxy.jsonl", "every proxy evaluation (held-out nominal images with synthetic anomalies): the "
                                 "proxy score and AUROCs that select the checkpoint, and the collapse monitors "
                                 "(effective rank, nearest-neighbour distances, weight distance)")}


def _step_panels(frames: dict[str, pd.DataFrame]):
    """A grid with one panel per numeric logged quantity against the step, one line per category."""
    keys = [k for k in dict.fromkeys(k for f in frames.values() for k in f.columns)
            if k not in LOG_SKIP and not k.endswith("_time_s")
            and all(pd.api.types.is_numeric_dtype(f[k]) and not pd.api.types.is_bool_dtype(f[k])
                    for f in frames.values() if k in f)]
    if not keys:
        return None
    fig, axes = _grid(len(keys), 1.7, 0.5)
    for ax, key in zip(axes.flat, keys):
        for category, log in frames.items():
            if key in log and "step" in log:
                ax.plot(log["step"], log[key], lw=1, marker="." if len(log) < 20 else None, label=category)
        ax.set_title(key, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=7)
    _legend(fig, axes.flat[0], ncols=4)
    return fig


def finetune_figure(comparison: Comparison) -> list[Figure]:
    """Per fine-tuned arm: the training log, then the proxy-selection log (when its first seed's checkpoints
    have them)."""
    built = []
    for kind, (suffix, what) in LOGS.items():
        for arm in comparison.others:
            logs = {category: sidecar.with_suffix(f".{suffix}") for category, sidecar in sidecars(first_run(arm.runs))}
            fig = _step_panels({category: pd.DataFrame(read_log(path)) for category, path in logs.items()
                                if path.is_file()})
            if fig is not None:
                caption = (f"Fine-tuning of {arm.name} (first seed), per category against the step: {what} "
                           f"(<category>.{suffix}).")
                built.append(Figure(f"finetune_{kind}_{comparison.name}_{arm.name}", fig, caption))
    return built
