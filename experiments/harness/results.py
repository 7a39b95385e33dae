"""The run record: ``results.json`` (the schema later tools read), ``scores.csv`` and the printed table.

Schema (a contract: the report and sweeps read it)::

    {"schema_version": 3, "metric_definitions": {<metric>: <what it computes>},
     "config": <resolved config, parts taken whole by interpolation kept as references: config_record>,
     "config_hash": <experiments/harness/run_key.py>,
     "preprocessing": {"resize", "image_size"},
     "categories": {"<name>": {"image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro",
                               "aupro_defect_images", "n_train", "n_test", "bank_size", "pixel_metrics_note",
                               "image_metrics_note" (why the image metrics are null: no nominal or no defect
                               test images; null when they were computed),
                               "resumed_from" (only when taken over from an interrupted run),
                               "timings_s": {"train" | "extract", "coreset", "predict", "evaluate" (the metrics;
                                             from 2026-12-06)},
                               "threshold": {...}  (only with a threshold rule),
                               "excluded_from_main_metrics": {"<defect type>": {"image_auroc", "n_images",
                                   "n_nominal"}}  (only for datasets that declare such types, e.g. ELPV's
                                   uncertain cells: scored, in scores.csv, but out of every metric above)}},
     "mean": {"image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro"},
     "not_computable": {<metric>: [<category>, ...]}  (the categories whose value is null: their mean leaves
                                                      them out, so it is not over every category),
     "failed": {"<name>": "<error>"}, "complete": bool,
     "peak_rss_mb", "total_time_s", "versions", "git_commit"}

Version 1 (records made before ``schema_version`` existed) has no ``metric_definitions`` and no
``aupro_defect_images``, and may hold ``memory`` where version 2 holds ``search`` / ``storage``; readers
treat a missing ``schema_version`` as 1. Version 2 holds the PatchCore settings flat under ``patchcore`` and
a resolved copy of every part under ``model``; version 3 holds them once, nested by the class that takes them
(``patchcore.embedder.*``, ``patchcore.scoring.*``), with ``model: "${patchcore}"``.
Metrics are floats in [0, 1], ``null`` where they cannot be computed.
``METRICS`` and ``TIMINGS`` are the one list of their names: the table below, the tracker and the report
read them from here.
"""

from __future__ import annotations

import csv
import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.io import write_csv_atomic

METRIC_TITLES = {"image_auroc": "Image AUROC", "image_f1_max": "Image F1-max", "pixel_auroc": "Pixel AUROC",
                 "pixel_f1_max": "Pixel F1-max", "aupro": "AUPRO"}
METRICS = tuple(METRIC_TITLES)  # the order of results.json and the printed table
# Recorded and averaged too, but not in the printed table: the official PatchCore README's PRO convention
# (over the anomalous test images only), for comparing with its published figures.
EXTRA_METRICS = ("aupro_defect_images",)
SCHEMA_VERSION = 3
# Fit stages named for what they measure (train: models fitted by training, e.g. the CAE; extract + coreset:
# PatchCore), then prediction; a category records the ones its model has.
TIMINGS = ("train", "extract", "coreset", "predict", "evaluate")
REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "scipy", "hydra-core", "patchcore-suite")


def config_record(node: DictConfig) -> dict:
    """The resolved config as results.json records it. A part that a node takes whole by interpolation
    (``model: ${patchcore}``, ``extractor: ${backbone}``) stays a reference, so each setting is recorded once,
    where users set it, and a comparison of records sees each difference once."""
    record = {}
    for key in node:
        if OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(node[key]):
            record[key] = node._get_node(key)._value()
        elif OmegaConf.is_dict(node[key]):
            record[key] = config_record(node[key])
        else:
            value = node[key]
            record[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return record


def mean_metrics(categories: dict[str, dict]) -> dict[str, float | None]:
    """Mean over categories of each metric, skipping categories where it is ``null`` (or, in a version-1
    record, absent)."""
    means: dict[str, float | None] = {}
    for metric in (*METRICS, *EXTRA_METRICS):
        values = [entry[metric] for entry in categories.values() if entry.get(metric) is not None]
        means[metric] = sum(values) / len(values) if values else None
    return means


def not_computable(categories: dict[str, dict]) -> dict[str, list[str]]:
    """Metric -> the categories where it is null (not computable: no masks, no nominal or no defect test
    images), so a record says which means are over fewer categories than the run's."""
    missing = {metric: [name for name, entry in categories.items() if entry.get(metric) is None]
               for metric in (*METRICS, *EXTRA_METRICS)}
    return {metric: names for metric, names in missing.items() if names}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> str | None:
    """The commit the code ran from, with ``-dirty`` when the work tree had changes; null outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


SCORE_COLUMNS = ("category", "path", "defect_type", "label", "image_score")


def write_scores_csv(path: Path, rows: list[dict]) -> None:
    write_csv_atomic(path, SCORE_COLUMNS, rows)


def read_scores_csv(path: Path, categories: set[str]) -> list[dict]:
    """The rows of ``categories`` in a scores.csv written by ``write_scores_csv`` (typed back), or [] without one."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="") as handle:
        return [{**row, "label": int(row["label"]), "image_score": float(row["image_score"])}
                for row in csv.DictReader(handle) if row.get("category") in categories]


def format_table(categories: dict[str, dict], means: dict[str, float | None]) -> str:
    """Category x metric table in percent, with the mean row, for the terminal and the log."""
    header = ["category", *METRICS]
    rows = [[name, *(_percent(entry.get(metric)) for metric in METRICS)] for name, entry in categories.items()]
    rows.append(["mean", *(_percent(means.get(metric)) for metric in METRICS)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines) + "\n(metrics in %; '-' = not computable, e.g. no masks)"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


# How running out of memory reads: oneDNN's failed allocation on a CPU, torch's CPU allocator, CUDA
# (torch.OutOfMemoryError says "CUDA out of memory").
OUT_OF_MEMORY = ("could not create a primitive", "out of memory", "can't allocate memory")


def out_of_memory_message(error: BaseException, batch_size: int, image_size: int) -> str | None:
    """One line for an error that means the machine ran out of memory, naming the settings that lower the
    need (None for any other error: its own message and traceback say more)."""
    text = str(error)
    if not (isinstance(error, MemoryError) or isinstance(error, RuntimeError)
            and any(marker in text.lower() for marker in OUT_OF_MEMORY)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return (f"out of memory ({type(error).__name__}: {first[:120]}): lower batch_size (now {batch_size}) or "
            f"dataset.image_size (now {image_size}), or run where more memory is free")


def failure_message(error: BaseException) -> str:
    """``Type: message`` of a failed category for results.json; an error re-raised from a DataLoader worker
    (whose message is the worker's whole traceback) is unwrapped to the dataset's own last line. The full
    traceback goes to the log, not here."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), text)
        name, sep, message = last.partition(": ")
        text = message if sep and name.rpartition(".")[2] == type(error).__name__ else last
    return f"{type(error).__name__}: {text}"
