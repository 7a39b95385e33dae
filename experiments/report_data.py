"""The report's input: every run found, which ones go in, and one tidy row per (run, category).

A run is a folder with ``results.json`` (the schema of ``experiments/results.py``). Runs go into the
report when they are complete and on the report's dataset (the one most complete runs used, or
``--dataset``); the others are listed with the reason, never mixed in. Two runs with the same config
hash are one run: the newest counts, the older is listed as a duplicate.

Each run gets a *variant* label: its backbone plus the settings that vary between the report's runs
where the run's value differs from that backbone's default config (``conf/``), e.g. ``wrn50 (ratio=0.01)``
or ``effnet_lite0 (layers=blocks.4)``; settings every run shares are listed once in the report instead.
Random weights are always in the label. Seeds are not: runs that differ only in ``seed`` (or in settings
that do not change the numbers, ``NOT_VARIANT``) are repeats of one variant.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from experiments.results import METRICS
from experiments.run_key import IGNORED_KEYS, iter_results, read_results, results_hash

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Never part of a variant label: the run's identity (category, seed), where data lives, and settings that
# do not change the numbers.
NOT_VARIANT = {"category", "seed", "coreset.seed", "dataset.root", "dataset.categories", "dataset.name",
               "dataset._target_", "backbone.name", "device", "batch_size", "save_model", "backbone.category",
               *IGNORED_KEYS}
SHORT_NAMES = {"coreset._target_": "sampler", "backbone.layers": "layers", "coreset.ratio": "ratio",
               "dataset.train_limit": "train_limit", "backbone.pretrained": "weights"}
TIMINGS = ("train", "extract", "coreset", "predict")


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
    def backbone(self) -> str:
        """The backbone's name; for another model than PatchCore (``model=cae``) the model's name."""
        model = (self.config.get("model") or {}).get("name", "patchcore")
        if model != "patchcore":
            return str(model)
        return str((self.config.get("backbone") or {}).get("name", "?"))

    @property
    def command(self) -> str:
        if self.overrides is None:
            return "(overrides not recorded: see the config in results.json)"
        return " ".join(["python experiments/main.py", *(shlex.quote(o) for o in self.overrides)])


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def discover(folders: list[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run below ``folders``; unreadable records come back as (folder, reason)."""
    runs, broken = [], []
    for path in iter_results(folders):
        results = read_results(path)
        if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
            broken.append((path.parent, "results.json unreadable or without a config"))
            continue
        run = Run(path.parent, results, results_hash(results))
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        if overrides_file.is_file():
            try:
                run.overrides = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []]
            except yaml.YAMLError:
                run.overrides = None
        if (path.parent.parent / "multirun.yaml").is_file():
            run.sweep = path.parent.parent
        runs.append(run)
    return runs, broken


def select(runs: list[Run], dataset: str | None = None) -> tuple[list[Run], list[tuple[Run, str]], str | None]:
    """(included runs, excluded runs with the reason, the report's dataset)."""
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
    if dataset is None:
        counts = Counter(run.dataset for run in complete)
        dataset = min(counts, key=lambda name: (-counts[name], name)) if counts else None
    on_dataset = []
    for run in complete:
        if run.dataset != dataset:
            excluded.append((run, f"dataset {run.dataset} (this report is on {dataset})"))
        else:
            on_dataset.append(run)
    newest: dict[str, Run] = {}
    for run in sorted(on_dataset, key=lambda r: ((r.folder / "results.json").stat().st_mtime, str(r.folder))):
        if run.key in newest:
            excluded.append((newest[run.key], f"duplicate of {run.folder} (same config hash {run.key}, older)"))
        newest[run.key] = run
    included = sorted(newest.values(), key=lambda r: str(r.folder))
    label_variants(included)
    return included, excluded, dataset


def default_config(backbone: str, dataset: str) -> dict | None:
    """The config ``conf/`` gives this backbone and dataset (None when they are not in conf/)."""
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"backbone={backbone}", f"dataset={dataset}"])
        return OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # unknown group option, missing env var, hydra missing: fall back to the modal values
        return None


def _format(key: str, value) -> str:
    if key == "backbone.pretrained":
        return "ImageNet" if value else "random"
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    if value is None:
        return "all" if key == "dataset.train_limit" else "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label(backbone: str, deviations: dict, without: tuple[str, ...] = ()) -> str:
    """``backbone (key=value, ...)`` over the deviations not in ``without``."""
    keys = [k for k in sorted(deviations) if k not in without]
    shorts = {k: SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    counts = Counter(shorts.values())
    parts = []
    for key in keys:
        if key == "backbone.pretrained" and deviations[key] is False:
            parts.append("random weights")
            continue
        name = shorts[key] if counts[shorts[key]] == 1 else key
        parts.append(f"{name}={_format(key, deviations[key])}")
    return f"{backbone} ({', '.join(parts)})" if parts else backbone


def label_variants(runs: list[Run]) -> None:
    """Fill ``deviations`` (settings that differ from the backbone's default) and ``variant`` of each run."""
    by_backbone: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_backbone.setdefault((run.backbone, run.dataset), []).append(run)
    # A key missing from a run's config was added to conf/ after the run: the run had its default.
    flats = {id(run): _variant_settings(run.config) for run in runs}
    varying = {key for key in set().union(*flats.values())
               if len({json.dumps(flat[key], sort_keys=True) for flat in flats.values() if key in flat}) > 1}
    for (backbone, dataset), group in by_backbone.items():
        defaults = default_config(backbone, dataset)
        reference = _variant_settings(defaults) if defaults is not None else {}
        for key in varying:
            if key not in reference or _is_interpolation(reference[key]):
                values = Counter(json.dumps(flats[id(run)][key], sort_keys=True) for run in group
                                 if key in flats[id(run)])
                reference[key] = json.loads(values.most_common(1)[0][0]) if values else None
        for run in group:
            flat = flats[id(run)]
            run.deviations = {k: flat[k] for k in varying if k in flat and flat[k] != reference[k]}
            if (run.config.get("backbone") or {}).get("pretrained") is False:
                run.deviations["backbone.pretrained"] = False  # always said: random weights are no result
            run.variant = label(backbone, run.deviations)


def _variant_settings(config: dict) -> dict:
    return {k: v for k, v in flatten(config).items() if k not in NOT_VARIANT and k.split(".")[0] not in NOT_VARIANT}


def _is_interpolation(value) -> bool:
    return isinstance(value, str) and "${" in value


def sort_value(value):
    """A key that orders None < numbers < strings < lists."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool):
        return (1, int(value), "")
    if isinstance(value, (int, float)):
        return (1, value, "")
    return (2, 0, json.dumps(value))


def variant_order(runs: list[Run]) -> list[str]:
    """Variants by backbone (first seen), fewest deviations first, then by the deviating values."""
    first_seen = {}
    for run in runs:
        first_seen.setdefault(run.backbone, len(first_seen))
    keyed = {}
    for run in runs:
        keyed.setdefault(run.variant, (first_seen[run.backbone], len(run.deviations),
                                       [(k, sort_value(v)) for k, v in sorted(run.deviations.items())]))
    return sorted(keyed, key=lambda v: keyed[v])


def tidy(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, category): identity, the swept settings, metrics, sizes and timings."""
    rows = []
    for run in runs:
        config = run.config
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
                "n_train": entry.get("n_train"), "n_test": entry.get("n_test"), "bank_size": entry.get("bank_size"),
                **{f"{stage}_s": timings.get(stage) for stage in TIMINGS},
                "peak_rss_mb": run.results.get("peak_rss_mb"), "total_time_s": run.results.get("total_time_s"),
                "config_hash": run.key, "run_dir": str(run.folder),
                "finished": (run.folder / "results.json").stat().st_mtime,
            })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        numeric = [*METRICS, "n_train", "n_test", "bank_size", *(f"{s}_s" for s in TIMINGS), "peak_rss_mb",
                   "total_time_s"]
        for column in numeric:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        # fit time: feature extraction + coreset selection (PatchCore), or training (models such as the CAE)
        frame["fit_s"] = frame[["train_s", "extract_s", "coreset_s"]].sum(axis=1, min_count=1)
    return frame


def drop_repeats(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """One row per (variant, seed, category): the newest run's. Older rows (the same experiment run again,
    e.g. before and after a new config key, or on another device) come back as left-out notes."""
    if frame.empty:
        return frame, []
    frame = frame.sort_values(["finished", "run_dir"])
    repeated = frame.duplicated(["variant", "seed", "category"], keep="last")
    newest = frame[~repeated].set_index(["variant", "seed", "category"])["run_dir"]
    notes = [{"run_dir": row.run_dir,
              "reason": f"{row.category}: repeat of {newest[(row.variant, row.seed, row.category)]} "
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
