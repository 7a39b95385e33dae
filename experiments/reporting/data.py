"""The report's input: every run found, which ones go in, and one tidy row per (run, category).

A run is a folder with ``results.json`` (the schema of ``experiments/harness/results.py``). Runs go into the
report when they are complete and on the report's datasets (a study's, from its manifest; else the one most
complete runs used; or ``--dataset``); the others are listed with the reason, never mixed in. Two runs with the
same config hash are one run: the newest counts, the older is listed as a duplicate. Variant labels:
``comparisons.label_variants``.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from experiments.harness.results import METRICS, TIMINGS
from experiments.harness.run_key import iter_results, read_results, results_hash


@dataclass
class Run:
    folder: Path
    results: dict
    key: str | None
    overrides: list[str] | None = None
    sweep: Path | None = None           # the multirun folder holding this run, if any
    deviations: dict = field(default_factory=dict)
    variant: str = ""

    @property
    def config(self) -> dict:
        return self.results.get("config") or {}

    @property
    def dataset(self) -> str:
        return str((self.config.get("dataset") or {}).get("name", "?"))

    @property
    def model(self) -> str:
        """The model's config node (``patchcore``, ``cae``): results.json records ``model: ${<node>}``
        (schema 3); older records hold the model node itself."""
        model = self.config.get("model") or {}
        if isinstance(model, str):
            return model.strip("${}")
        return str(model.get("name") or str(model.get("_target_", "patchcore")).rsplit(".", 1)[-1].lower())

    @property
    def backbone(self) -> str:
        """The backbone's name; for another model than PatchCore (``model=cae``) the model's name."""
        if self.model != "patchcore":
            return self.model
        return str((self.config.get("backbone") or {}).get("name", "?"))

    @property
    def command(self) -> str:
        if self.overrides is None:
            return "(overrides not recorded: see the config in results.json)"
        return " ".join(["python experiments/main.py", *(shlex.quote(o) for o in self.overrides)])


def setting(config: dict, key: str):
    """The value of a dotted key in a (results.json) config, None when absent."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def sort_value(value):
    """A key that orders None < numbers < strings < lists."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool):
        return (1, int(value), "")
    if isinstance(value, (int, float)):
        return (1, value, "")
    return (2, 0, json.dumps(value))


def first_run(runs: list[Run]) -> Run:
    """The run of the first seed (the one whose maps, ROC curves and fine-tuning logs the report shows)."""
    return min(runs, key=lambda r: (sort_value(r.config.get("seed")), str(r.folder)))


def sidecars(run: Run) -> list[tuple[str, Path]]:
    """(category, the fine-tuning sidecar JSON next to its checkpoint) of a run on a fine-tuned backbone
    (docs/finetuning.md); its logs are ``<category>.loss.jsonl`` / ``.proxy.jsonl`` beside it."""
    checkpoint = setting(run.config, "backbone.checkpoint")
    categories = sorted(run.results.get("categories") or {}) if checkpoint else []
    return [(category, Path(str(checkpoint)).parent / f"{category}.json") for category in categories]


def read_sidecar(path: Path) -> dict | None:
    """A finished sidecar with its checkpoint selection, else None."""
    record = read_results(path)
    return record if isinstance(record, dict) and record.get("complete") and record.get("selection") else None


def finetune_seconds(run: Run) -> dict[str, float]:
    """category -> the seconds its fine-tuning took (the sidecar's training time plus its proxy evaluations), for a
    run on a fine-tuned backbone; empty for others. Part of the arm's cost: the report adds it to the fit time."""
    found = {}
    for category, path in sidecars(run):
        record = read_sidecar(path)
        if record is not None and record.get("train_time_s") is not None:
            found[category] = float(record["train_time_s"]) + float(record["selection"].get("eval_time_s") or 0)
    return found


def read_log(path: Path) -> list[dict]:
    """The rows of a fine-tuning log (``<category>.loss.jsonl`` / ``.proxy.jsonl``); none without the file."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def read_overrides(folder: Path) -> list[str] | None:
    """A job's command-line overrides (``.hydra/overrides.yaml``), None when not recorded."""
    try:
        return [str(o) for o in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, yaml.YAMLError):
        return None


def discover(folders: list[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run below ``folders``; unreadable records come back as (folder, reason)."""
    runs, broken = [], []
    for path in iter_results(folders):
        results = read_results(path)
        if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
            broken.append((path.parent, "results.json unreadable or without a config"))
            continue
        run = Run(path.parent, results, results_hash(results), read_overrides(path.parent))
        if (path.parent.parent / "multirun.yaml").is_file():
            run.sweep = path.parent.parent
        runs.append(run)
    return runs, broken


def select(runs: list[Run], dataset: str | None = None,
           datasets: list[str] | None = None) -> tuple[list[Run], list[tuple[Run, str]], list[str]]:
    """(included runs, excluded runs with the reason, the report's datasets); label them next
    (``comparisons.label_variants``). ``dataset``: report on this one only; else on ``datasets`` (a study's, in
    its order); else on the one most complete runs used."""
    excluded: list[tuple[Run, str]] = []
    complete = []
    for run in runs:
        results = run.results
        if results.get("complete") is not True:
            failed = results.get("failed") or {}
            why = f"failed: {', '.join(failed)}" if failed else "interrupted (not complete)"
            excluded.append((run, f"incomplete ({why}; {len(results.get('categories') or {})} categories done)"))
        else:
            complete.append(run)
    if dataset is not None:
        datasets = [dataset]
    elif not datasets:
        counts = Counter(run.dataset for run in complete)
        datasets = [min(counts, key=lambda name: (-counts[name], name))] if counts else []
    on_dataset = []
    for run in complete:
        if run.dataset not in datasets:
            excluded.append((run, f"dataset {run.dataset} (this report is on {' and '.join(datasets)})"))
        else:
            on_dataset.append(run)
    newest: dict[str, Run] = {}
    for run in sorted(on_dataset, key=lambda r: ((r.folder / "results.json").stat().st_mtime, str(r.folder))):
        if run.key in newest:
            excluded.append((newest[run.key], f"duplicate of {run.folder} (same config hash {run.key}, older)"))
        newest[run.key] = run
    included = sorted(newest.values(), key=lambda r: str(r.folder))
    return included, excluded, list(datasets)


def tidy(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, category): identity, the swept settings, metrics, sizes and timings."""
    rows = []
    for run in runs:
        config = run.config
        tuning = finetune_seconds(run)
        for category, entry in (run.results.get("categories") or {}).items():
            timings = entry.get("timings_s") or {}
            rows.append({
                "variant": run.variant, "backbone": run.backbone, "category": category,
                "seed": config.get("seed"), "dataset": run.dataset,
                "coreset_ratio": (config.get("coreset") or {}).get("ratio"),
                "layers": "+".join(map(str, (config.get("backbone") or {}).get("layers") or [])),
                "train_limit": (config.get("dataset") or {}).get("train_limit"),
                "pretrained": (config.get("backbone") or {}).get("pretrained", True),
                **{metric: entry.get(metric) for metric in METRICS},
                "pixel_metrics_note": entry.get("pixel_metrics_note"),
                "n_train": entry.get("n_train"), "n_test": entry.get("n_test"), "bank_size": entry.get("bank_size"),
                **{f"{stage}_s": timings.get(stage) for stage in TIMINGS}, "finetune_s": tuning.get(category),
                "peak_rss_mb": run.results.get("peak_rss_mb"), "total_time_s": run.results.get("total_time_s"),
                "config_hash": run.key, "run_dir": str(run.folder),
                "finished": (run.folder / "results.json").stat().st_mtime,
            })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        numeric = [*METRICS, "n_train", "n_test", "bank_size", *(f"{s}_s" for s in TIMINGS), "finetune_s",
                   "peak_rss_mb", "total_time_s"]
        for column in numeric:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        # fit time: feature extraction + coreset selection (PatchCore), or training (models such as the CAE), plus
        # the fine-tuning of a fine-tuned backbone on that category: what the arm costs, everywhere it is compared
        frame["fit_s"] = frame[["train_s", "extract_s", "coreset_s", "finetune_s"]].sum(axis=1, min_count=1)
    return frame


def drop_repeats(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """One row per (variant, seed, category): the newest run's. Older rows (the same experiment run again,
    e.g. before and after a new config key, or on another device) come back as left-out notes."""
    if frame.empty:
        return frame, []
    frame = frame.sort_values(["finished", "run_dir"])
    keys = ["dataset", "variant", "seed", "category"]  # the same variant on two datasets is no repeat
    repeated = frame.duplicated(keys, keep="last")
    newest = frame[~repeated].set_index(keys)["run_dir"]
    notes = [{"run_dir": row.run_dir,
              "reason": f"{row.category}: repeat of {newest[(row.dataset, row.variant, row.seed, row.category)]} "
                        f"(same variant, seed and category, older)"}
             for row in frame[repeated].itertuples()]
    return frame[~repeated].sort_index(), notes


def sweep_commands(runs: list[Run]) -> list[str]:
    """The command line of every multirun the included runs came from, as typed (from multirun.yaml)."""
    commands = []
    for sweep in sorted({run.sweep for run in runs if run.sweep is not None}):
        try:
            record = yaml.safe_load((sweep / "multirun.yaml").read_text())
            task = record["hydra"]["overrides"]["task"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
        commands.append(" ".join(["python experiments/main.py -m", *(shlex.quote(str(o)) for o in task)]))
    return commands


def seed_means(frame: pd.DataFrame, column: str, categories: list[str]) -> list[float]:
    """Per seed, the mean of ``column`` over ``categories`` (seeds missing a category are left out)."""
    means = []
    for _, rows in frame.groupby("seed", dropna=False):
        if set(categories) <= set(rows["category"]):
            values = rows.loc[rows["category"].isin(categories), column].dropna()
            if len(values):
                means.append(float(values.mean()))
    return means
