"""The fine-tuning diagnostics (the paper's appendix): per fine-tuned arm, every quantity its checkpoints'
``.loss.jsonl`` / ``.proxy.jsonl`` logs record against the training step, one line per category, each panel's
y axis named in words (``LOG_WORDS``); a quantity that never changes (the proxy's bank size) is named in the
caption with its value instead of drawn."""

from __future__ import annotations

import textwrap

import pandas as pd

from experiments.reporting.comparisons import Comparison
from experiments.reporting.data import first_run, read_log, sidecars
from experiments.reporting.figures import Figure, _grid, _legend

LOG_SKIP = {"step", "epoch", "time_s", "lr_backbone", "lr_head"}
LOGS = {"loss": ("loss.jsonl", "every training step's loss, task loss, L2-SP term and accuracy"),
        "proxy": ("proxy.jsonl", "every proxy evaluation (held-out nominal images with synthetic anomalies): the "
                                 "proxy score and AUROCs that select the checkpoint, and the collapse monitors "
                                 "(effective rank, nearest-neighbour distances, weight distance)")}
# A logged quantity in words (image_auroc_<family or severity>: "proxy image AUROC, <that> anomalies"; others not
# listed: the key with spaces).
LOG_WORDS = {"loss": "training loss", "task_loss": "task loss", "l2sp": "L2-SP penalty", "accuracy": "task accuracy",
             "score": "proxy score (selects the checkpoint)", "image_auroc": "proxy image AUROC",
             "pixel_auroc": "proxy pixel AUROC", "mean_auroc": "proxy mean AUROC",
             "effective_rank": "effective rank of the features",
             "nn_distance_mean": "mean nearest-neighbour distance", "nn_distance_std": "std of NN distances",
             "nn_distance_cv": "NN distances: std / mean", "bank_size": "proxy memory-bank size",
             "weight_distance": "weight distance ||w - w0||", "weight_distance_rel": "relative ||w - w0|| / ||w0||"}


def log_words(key: str) -> str:
    if key in LOG_WORDS:
        return LOG_WORDS[key]
    if key.startswith("image_auroc_"):
        return f"proxy AUROC, {key.removeprefix('image_auroc_')} anomalies"
    return key.replace("_", " ")


def _quantities(frames: dict[str, pd.DataFrame]) -> tuple[list[str], dict[str, str]]:
    """(the numeric logged quantities that change over the steps, {quantity in words: its value} of those that do
    not: the same value at every step of every category, or no value at all)."""
    keys = [k for k in dict.fromkeys(k for f in frames.values() for k in f.columns)
            if k not in LOG_SKIP and not k.endswith("_time_s")
            and all(pd.api.types.is_numeric_dtype(f[k]) and not pd.api.types.is_bool_dtype(f[k])
                    for f in frames.values() if k in f)]
    varying, constant = [], {}
    for key in keys:
        values = pd.concat([f[key] for f in frames.values() if key in f]).dropna()
        if values.nunique() > 1:
            varying.append(key)
        elif len(values):
            constant[log_words(key)] = f"{values.iloc[0]:g}"
    return varying, constant


def _step_panels(frames: dict[str, pd.DataFrame], keys: list[str]):
    """A grid with one panel per quantity against the step, one line per category."""
    fig, axes = _grid(len(keys), 1.25, 0.45, columns=5)
    for ax, key in zip(axes.flat, keys):
        for category, log in frames.items():
            if key in log and "step" in log:
                ax.plot(log["step"], log[key], lw=1, marker="." if len(log) < 20 else None, label=category)
        ax.set_ylabel(textwrap.fill(log_words(key), 20), fontsize=5.5)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=7)
    _legend(fig, axes.flat[0], ncols=4)
    return fig


def finetune_figure(comparison: Comparison, seen: set | None = None) -> list[Figure]:
    """Per fine-tuned arm: the training log, then the proxy-selection log (when its first seed's checkpoints
    have them). ``seen``: the log files already drawn (a fine-tuning shared by two comparisons, drawn once)."""
    built, seen = [], set() if seen is None else seen
    for kind, (suffix, what) in LOGS.items():
        for arm in comparison.others:
            logs = {category: sidecar.with_suffix(f".{suffix}") for category, sidecar in sidecars(first_run(arm.runs))}
            logs = {category: path for category, path in logs.items() if path.is_file()}
            if not logs or set(logs.values()) <= seen:
                continue
            seen.update(logs.values())
            frames = {category: pd.DataFrame(read_log(path)) for category, path in logs.items()}
            keys, constant = _quantities(frames)
            if not keys:
                continue
            same = ("; not drawn, the same at every step: " + ", ".join(f"{k} {v}" for k, v in constant.items())
                    if constant else "")
            caption = (f"Fine-tuning of {arm.name} ({comparison.title.lower()}, first seed), per category against "
                       f"the training step: {what} (<category>.{suffix}){same}.")
            built.append(Figure(f"finetune_{kind}_{comparison.name}_{arm.name}", _step_panels(frames, keys), caption))
    return built
