"""The paper's figures per comparison: sweep curves (metric against the swept value, the baseline at its own
value), ROC curves and anomaly-map grids of the same test images under each arm (experiments/reporting/
figures.py draws those two), and fine-tuning curves (per step: loss, task accuracy and every other
monitored quantity in the checkpoints' ``.loss.jsonl`` logs, H14's proxy metric and collapse monitors
included when present). A builder returns nothing when its comparison has nothing to draw."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.harness.results import METRIC_TITLES  # noqa: E402
from experiments.reporting import figures  # noqa: E402
from experiments.reporting.comparisons import Comparison, categories_of  # noqa: E402
from experiments.reporting.data import seed_means  # noqa: E402
from experiments.reporting.figures import Figure  # noqa: E402

WIDTH = 6.3  # inches: the A4 text width of the Typst layout
CURVES = ("image_auroc", "pixel_auroc", "aupro")
LOG_SKIP = {"step", "epoch", "time_s", "lr_backbone", "lr_head"}


def _value(run, key: str):
    value = run.config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def sweep_figure(comparison: Comparison) -> list[Figure]:
    """Mean over categories (each seed's first) against the swept value; error bars: std over seeds."""
    if not comparison.sweep or not comparison.others:
        return []
    key, categories = comparison.sweep, categories_of(comparison)
    points = []  # (x value, label, arm, rows)
    for arm in comparison.arms:
        value = _value(arm.runs[0], key)
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
    fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH, 2.2), constrained_layout=True)
    for ax, panel in zip(axes, panels):
        xs, ys, errs = [], [], []
        for i, (x, _, arm) in enumerate(points):
            means = seed_means(arm.rows, panel, categories)
            if not means:
                continue
            scale = 1 if panel == "fit_s" else 100
            xs.append(x if numeric else i)
            ys.append(scale * float(np.mean(means)))
            errs.append(scale * float(np.std(means, ddof=1)) if len(means) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, lw=1)
        base = next((k for k, p in enumerate(points) if p[2] is comparison.baseline), None)
        if base is not None and means:
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
    built = figures.roc_figures(runs, rows, arms)
    for figure in built:
        figure.name = f"roc_{comparison.name}"
        figure.caption = f"{comparison.title}: {figure.caption[0].lower()}{figure.caption[1:]}"
    return built


def map_figure(comparison: Comparison, category: str, images: int = 3) -> list[Figure]:
    runs, rows, arms = _by_arm(comparison)
    built = figures.map_figures(runs, rows[rows["category"] == category], arms, max_images=images)
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
        checkpoint = _value(run, "backbone.checkpoint")
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
    fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, 1.7 * nrows + 0.5), squeeze=False, constrained_layout=True)
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


def save(figure: Figure, folder: Path) -> str:
    """Write the PNG (and PDF) and return the PNG's path relative to the report folder."""
    png, _ = figures.save(figure, folder, dpi=130)
    return f"{folder.name}/{png.name}"
