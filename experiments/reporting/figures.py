"""The report's figures (matplotlib, saved as PNG and PDF), each drawn over groups of runs (a comparison's
arms, or the run digest's variants): ROC curves and sweep curves (metric against the swept value, the baseline at
its own value); the anomaly-map grids are map_figures.py's, the fine-tuning logs finetune_figures.py's. A builder
returns nothing when there is nothing to draw. Axes are labelled in words (``SETTING_WORDS``), never with
config keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.harness.results import METRIC_TITLES  # noqa: E402
from experiments.reporting.comparisons import Comparison, categories_of, format_value  # noqa: E402
from experiments.reporting.data import Run, first_run, seed_means, setting  # noqa: E402
from experiments.reporting.intervals import image_scores  # noqa: E402
from experiments.reporting.stats import mean_std  # noqa: E402

PAGE_WIDTH = 6.3  # inches: the A4 text width of the Typst layout
CURVES = ("image_auroc", "pixel_auroc", "aupro")
MAX_CURVES = 6
# How an axis names a swept setting (a key not listed: its last part, underscores as spaces).
SETTING_WORDS = {"dataset.train_limit": "training images per category", "coreset.ratio": "coreset ratio",
                 "patchcore.scoring.num_neighbors": "nearest neighbours k",
                 "patchcore.embedder.patch_size": "neighbourhood size (patches)", "backbone.layers": "feature layers",
                 "dataset.image_size": "image size (px)", "dataset.resize": "resized image size (px)",
                 "patchcore.embedder.aggregation": "aggregation", "patchcore.embedder.embed_dim": "feature dimensions",
                 "patchcore.scoring.blur_sigma": "map blur sigma", "patchcore.scoring.distance": "distance",
                 "patchcore.scoring.image_score": "image score", "method.train.max_steps": "fine-tuning steps",
                 "coreset._target_": "memory-bank sampler", "backbone.name": "backbone"}
# Line styles that tell arms apart where their curves coincide: colour, dash pattern and marker all differ.
STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1)), "v"), ((0, (3, 1, 1, 1, 1, 1)), "P")]
Groups = list[tuple[str, list[Run]]]  # (label, its runs): a comparison's arms or the digest's variants


@dataclass
class Figure:
    name: str        # file stem
    figure: object   # matplotlib Figure
    caption: str
    width: float = 1.0  # its share of the text width on the page (a narrow map grid need not span it)


def save(figure: Figure, folder: Path, dpi: int = 130) -> str:
    """Write the PNG and the PDF; returns the PNG's path relative to the report folder (``folder``'s parent)."""
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{figure.name}.png"
    figure.figure.savefig(png, dpi=dpi)
    figure.figure.savefig(folder / f"{figure.name}.pdf")
    plt.close(figure.figure)
    return f"{folder.name}/{png.name}"


def words(key: str) -> str:
    """A setting's name on an axis or in a caption: SETTING_WORDS, else its key's last part in words."""
    return SETTING_WORDS.get(key) or key.rsplit(".", 1)[-1].replace("_", " ")


def style(k: int) -> dict:
    """The k-th group's line: its own colour, dash pattern and marker (markers offset so they do not overlap)."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dash, marker = STYLES[k % len(STYLES)]
    return {"color": colors[k % len(colors)], "ls": dash, "marker": marker, "ms": 3.5, "mfc": "none",
            "markevery": (0.03 + 0.025 * k, 0.15)}


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


def _grid(n: int, height: float, pad: float, columns: int = 4) -> tuple:
    """A figure of ``n`` panels, ``columns`` to a row, ``height`` inches per row (+ ``pad``); unused panels
    blank."""
    ncols, nrows = min(columns, n), math.ceil(n / min(columns, n))
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
    """Image-level ROC curves per category from each group's first seed's scores.csv; each group has its own
    colour, dash pattern and marker, and each panel lists the groups' AUROCs, so curves that coincide (a
    category every arm separates perfectly) stay readable."""
    from sklearn.metrics import roc_auc_score, roc_curve

    shown = pick(groups)
    if not categories or not shown:
        return []
    fig, axes = _grid(len(categories), 2.0, 0.8)
    drawn = False
    for ax, category in zip(axes.flat, categories):
        aurocs = []
        for k, (label, runs) in enumerate(shown):
            run = _on(runs, category)
            scores = _read_scores(run, category) if run else None
            if scores is None or len(set(scores[0])) < 2:
                continue
            fpr, tpr, _ = roc_curve(*scores)
            ax.plot(fpr, tpr, lw=1.1, label=label, clip_on=False, zorder=3 + k, **style(k))
            aurocs.append((k, roc_auc_score(*scores)))
            drawn = True
        for row, (k, auroc) in enumerate(aurocs):  # bottom right, where an ROC curve seldom passes
            ax.text(0.97, 0.04 + 0.085 * (len(aurocs) - 1 - row), f"{100 * auroc:.1f}", color=style(k)["color"],
                    fontsize=5.5, ha="right", transform=ax.transAxes)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.6, ls="--")
        ax.set_title(category, fontsize=9)
        ax.set_xlim(-0.02, 1)  # a curve along the axes (AUROC 100 %) stays visible beside the spine
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
               + (f"; the {len(shown)} variants closest to their defaults" if len(shown) < len(groups) else "")
               + "); the numbers in each panel: each variant's image AUROC (%), in its colour.")
    return [Figure(name, fig, f"{title}: i{caption}" if title else f"I{caption}")]


def _label_panel(ax, panel: str, xlabel: str) -> None:
    """A sweep panel's title (its metric), x label (the setting in words: on every panel) and grid."""
    ax.set_title("fit time (s / category)" if panel == "fit_s" else f"{METRIC_TITLES[panel]} (%)", fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.tick_params(axis="y", labelsize=6)
    ax.grid(alpha=0.3)


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
        for k, (label, points) in enumerate(series.items()):
            drawn = [(x, *mean_std([scale * m for m in seed_means(arm.rows, panel, categories)]))
                     for x, arm in sorted([(base_x, comparison.baseline), *points], key=lambda p: p[0])]
            drawn = [(x, mean, 0.0 if math.isnan(std) else std) for x, mean, std, n in drawn if n]
            if drawn:
                line = {key: value for key, value in style(k).items() if key != "markevery"}
                ax.errorbar([d[0] for d in drawn], [d[1] for d in drawn], yerr=[d[2] for d in drawn], capsize=2,
                            lw=1, label=label, **line)
        base = mean_std([scale * m for m in seed_means(comparison.baseline.rows, panel, categories)])
        if base[2]:
            ax.plot([base_x], [base[0]], marker="*", ms=9, color="tab:red", ls="none", label="baseline")
        if len(xs) > 2 and min(x for x in xs if x > 0) * 8 <= max(xs):
            ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
            ax.minorticks_off()
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=6, rotation=45)
        _label_panel(ax, panel, words(key))
    _legend(fig, axes.flat[0], ncols=4)
    caption = (f"{comparison.title}: the mean over categories against the {words(key)}, one curve per method "
               "through the baseline (the red star: no fine-tuning); error bars: sample std over seeds; a panel "
               "without a curve has no values (no pixel metrics on this dataset).")
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
        # a numeric setting: a curve; a categorical one (layer sets, aggregations): points, no line between them
        ax.errorbar([d[0] for d in drawn], [d[1] for d in drawn], yerr=[d[2] for d in drawn], marker="o", ms=3,
                    capsize=2, lw=1, ls="-" if numeric else "none")
        for x, mean, _, arm in drawn:
            if arm is comparison.baseline:
                ax.plot([x], [mean], marker="*", ms=9, color="tab:red", ls="none", label="baseline")
        if numeric and all(x > 0 for x in xs) and max(xs) / max(min(xs), 1e-12) >= 8:
            ax.set_xscale("log", base=2 if key == "dataset.train_limit" else 10)
            ax.minorticks_off()
        ax.set_xticks(xs, [p[1] for p in points], fontsize=6, rotation=45, **({} if numeric else {"ha": "right"}))
        if not numeric:
            ax.set_xlim(-0.5, len(xs) - 0.5)
        _label_panel(ax, panel, words(key))
    caption = (f"{comparison.title}: the mean over categories against the {words(key)} (the red star: the baseline)"
               f"{'' if numeric else '; one point per setting, no order between them'}; error bars: sample std over "
               "seeds; fit time = feature extraction + coreset selection.")
    return [Figure(f"sweep_{comparison.name}", fig, caption)]
