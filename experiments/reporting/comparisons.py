"""Runs in, comparisons out: the first stage of the report (runs -> comparisons -> document -> renderers).

A comparison is a baseline arm and the arms measured against it, on one dataset. A study's comparisons, titles,
datasets and order are its manifest's (``study.json``, from conf/study/*.yaml, the one place a comparison is
declared; a study on several datasets has each comparison once per dataset that runs it, against that dataset's
baseline, titled with the dataset); arms that could not run (no weights, a failed or unfinished job) are kept
with the reason. Other runs (a plain sweep) are
compared generically: the baseline is the most common backbone's variant without deviations, and every other
variant joins the comparison of the settings it deviates in, titled by them (a fine-tuned backbone is its own).

Variant labels: the backbone plus the settings that vary between the report's runs where the run's value differs
from that backbone's default config (``conf/``), e.g. ``wrn50 (ratio=0.01)``. Random weights are always in the
label; seeds (and ``NOT_VARIANT`` settings, which do not change the numbers) never: such runs are repeats.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.harness.run_key import BOOKKEEPING, IDENTITY, PLACEMENT, is_ignored, read_results
from experiments.reporting.data import Run, discover, drop_repeats, flatten, select, setting, sort_value, tidy
from experiments.reporting.wording import natural_key
from extensions.checkpoint import is_finetuned

BASELINE = "baseline"

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Never part of a variant label: the run's identity (category, seed), where data lives, and settings that
# do not change the numbers.
NOT_VARIANT = (*BOOKKEEPING, *IDENTITY)  # wherever they sit
NOT_VARIANT_TOP = PLACEMENT             # from the top only
# How a setting is named in a label where the last part of its dotted key would not say it.
LABEL_NAMES = {"coreset._target_": "sampler", "backbone.pretrained": "weights"}


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


def format_value(key: str, value) -> str:
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


def label(backbone: str, deviations: dict) -> str:
    """``backbone (key=value, ...)`` over the deviations."""
    keys = sorted(deviations)
    shorts = {k: LABEL_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    counts = Counter(shorts.values())
    parts = []
    for key in keys:
        if key == "backbone.pretrained" and deviations[key] is False:
            parts.append("random weights")
            continue
        name = shorts[key] if counts[shorts[key]] == 1 else key
        parts.append(f"{name}={format_value(key, deviations[key])}")
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
            if key not in reference or (isinstance(reference[key], str) and "${" in reference[key]):
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
    return {k: v for k, v in flatten(config).items()
            if not is_ignored(k, NOT_VARIANT) and not is_ignored(k, NOT_VARIANT_TOP, nested=False)}


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


@dataclass
class Arm:
    name: str
    rows: pd.DataFrame            # the tidy rows (data.tidy) of its runs
    runs: list[Run]

    @property
    def seeds(self) -> list:
        return sorted(self.rows["seed"].dropna().unique().tolist())

    @classmethod
    def of(cls, name: str, runs: list[Run], frame: pd.DataFrame) -> Arm:
        return cls(name, frame[frame["run_dir"].isin({str(run.folder) for run in runs})], runs)


@dataclass
class Comparison:
    name: str
    title: str
    arms: list[Arm]                                       # the baseline first
    missing: list[tuple[str, str]] = field(default_factory=list)  # (arm, why it is not in the comparison)
    sweep: str | None = None                              # the swept setting of a sweep
    dataset: str | None = None                            # the dataset its runs are on
    # a sweep whose values the runs' configs do not hold (fine-tuning steps): arm -> (series, value), from study.json
    points: dict[str, tuple[str, object]] = field(default_factory=dict)
    # a ``selection`` comparison (experiments/studies/selection_kind.py): study.json's record of it (space,
    # candidates: candidate name -> arm) and ``files``: seed -> its select job's selection.json
    selection: dict | None = None
    # its name in the study (``name`` is unique across datasets: ``<dataset>_<comparison>`` in a study of several)
    study_name: str | None = None
    # tables.paired_rows, bootstrapped once: every section and table of a build reads the same differences
    paired_cache: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def short_name(self) -> str:
        """The comparison's own name (``finetuning``), whatever its dataset."""
        return self.study_name or self.name

    @property
    def key(self) -> str:
        """``<dataset>/<comparison>``: how written text and study.json name it."""
        return f"{self.dataset}/{self.short_name}"

    @property
    def baseline(self) -> Arm:
        return self.arms[0]

    @property
    def others(self) -> list[Arm]:
        return self.arms[1:]


@dataclass
class Inputs:
    """What both documents are made from: the runs read once, their tidy rows, the runs left out (and why),
    the report's datasets, the study manifest (None for plain runs) and the comparisons."""

    run_dirs: list[str]
    runs: list[Run]
    frame: pd.DataFrame
    left_out: list[dict]
    datasets: list[str]
    manifest: dict | None
    comparisons: list[Comparison]

    @property
    def dataset(self) -> str | None:
        """The report's dataset, or its datasets joined with "and" (None without runs)."""
        return " and ".join(self.datasets) if self.datasets else None

    @property
    def baseline(self) -> Arm | None:
        return next((c.baseline for c in self.comparisons if c.arms), None)

    def on(self, dataset: str) -> list[Comparison]:
        """The comparisons on ``dataset``."""
        return [c for c in self.comparisons if c.dataset == dataset]

    @property
    def present(self) -> list[Comparison]:
        """The comparisons with at least one arm besides the baseline."""
        return [c for c in self.comparisons if c.arms and c.others]


def load(run_dirs: list[str | Path], dataset: str | None = None) -> Inputs:
    """Discover, select (complete, on one dataset, newest of duplicates), label and tabulate the runs below
    ``run_dirs``, and find their comparisons."""
    run_dirs = [str(d) for d in run_dirs]
    runs, broken = discover([Path(d) for d in run_dirs])
    # the study manifest of the first run folder that is a study
    manifest = next((read_results(Path(d) / "study.json") for d in run_dirs if (Path(d) / "study.json").is_file()),
                    None)
    included, excluded, datasets = select(runs, dataset, manifest_datasets(manifest) if manifest else None)
    label_variants(included)
    left_out = [{"run_dir": str(run.folder), "reason": why} for run, why in excluded]
    left_out += [{"run_dir": str(folder), "reason": why} for folder, why in broken]
    frame, repeats = drop_repeats(tidy(included))
    left_out += repeats
    if not frame.empty:
        included = [run for run in included if str(run.folder) in set(frame["run_dir"])]
    comparisons = (from_manifest(manifest, included, frame, datasets) if manifest else infer(included, frame)) \
        if included else []
    return Inputs(run_dirs, included, frame, left_out, datasets, manifest, comparisons)


def manifest_datasets(manifest: dict) -> list[str]:
    """A study's datasets, in its order (``datasets``; a manifest of the single-dataset form: its ``dataset``)."""
    if isinstance(manifest.get("datasets"), dict):
        return list(manifest["datasets"])
    return [str(manifest["dataset"])] if manifest.get("dataset") else []


def from_manifest(manifest: dict, runs: list[Run], frame: pd.DataFrame,
                  datasets: list[str] | None = None) -> list[Comparison]:
    """The study's comparisons on ``datasets`` (default: all of the study's) over the runs the report includes
    (missing arms kept with the reason); with several datasets each title says its dataset."""
    by_folder = {run.folder.resolve(): run for run in runs}
    jobs = {row["id"]: row for row in manifest.get("jobs", [])}
    specs = (manifest.get("config") or {}).get("comparisons") or {}
    study_datasets = manifest_datasets(manifest)
    datasets = study_datasets if datasets is None else datasets
    comparisons = []
    for key, entry in (manifest.get("comparisons") or {}).items():
        # a manifest that names no dataset: the report's (its runs were selected on it)
        dataset = entry.get("dataset") or manifest.get("dataset") or (datasets[0] if len(datasets) == 1 else None)
        name = entry.get("comparison") or key
        if dataset is not None and dataset not in datasets:
            continue
        members: dict[str, list[Run]] = {}
        problems: dict[str, list[str]] = {}
        job_arms = entry.get("job_arms") or {}  # a run shared with another comparison: its arm in this one
        for job_id in entry.get("jobs", []):
            job = jobs.get(job_id)
            if job is None or job["kind"] != "patchcore":
                continue
            arm = job_arms.get(job_id, job["arm"])
            run = by_folder.get(Path(job["folder"]).resolve())
            if run is None:
                why = job.get("status", "not run")
                why = {"pending": "not run yet", "running": "interrupted"}.get(why, why)
                problems.setdefault(arm, []).append(f"seed {job['seed']}: {why}")
            else:
                members.setdefault(arm, []).append(run)
        select_seeds = {jobs[j]["seed"] for j in entry.get("jobs", []) if j in jobs and jobs[j]["kind"] == "select"}
        if select_seeds and BASELINE in members:
            # a selection chooses per seed among candidates run at that seed: its defaults are the baseline's runs
            # at the same seeds (same training subset and coreset seed), so every table of the comparison pairs
            # seed with seed, however many more seeds the study's baseline ran
            members[BASELINE] = [run for run in members[BASELINE] if run.config.get("seed") in select_seeds]
        arms = [Arm.of(arm, members[arm], frame) for arm in entry.get("arms", []) if arm in members and members[arm]]
        missing = [(arm, "; ".join(why)) for arm, why in problems.items()]
        missing += [(row["arm"], row["reason"]) for row in manifest.get("skipped", [])
                    if row["comparison"] == name and row.get("dataset", dataset) == dataset]
        if not arms or arms[0].name != BASELINE:
            missing.insert(0, (BASELINE, "the baseline has no complete run"))
            arms = []
        spec = specs.get(name) or {}
        sweep = entry["sweep"] if "sweep" in entry else spec.get("sweep") if isinstance(spec, dict) else None
        title = entry.get("title", name) + (f" ({dataset})" if len(study_datasets) > 1 else "")
        points = {arm: (point["series"], point["value"]) for arm, point in (entry.get("points") or {}).items()}
        selection = {**entry["selection"], "files": {
            jobs[j]["seed"]: Path(jobs[j]["folder"]) / "selection.json" for j in entry.get("jobs", [])
            if j in jobs and jobs[j]["kind"] == "select"}} if entry.get("selection") else None
        comparisons.append(Comparison(key.replace("/", "_"), title, arms, missing, sweep, dataset, points, selection,
                                      name))
    return comparisons


def _is_sweep(arms: list[Arm], key: str) -> bool:
    """A numeric or list-valued setting (coreset.ratio, dataset.train_limit, backbone.layers) is drawn as a
    sweep: its value on the x axis; a choice between names (a distance, a class) is not."""
    values = [setting(arm.runs[0].config, key) for arm in arms]
    return all(v is None or isinstance(v, list) or (isinstance(v, (int, float)) and not isinstance(v, bool))
               for v in values) and any(v is not None for v in values)


def infer(runs: list[Run], frame: pd.DataFrame) -> list[Comparison]:
    """Comparisons of runs not made by a study: one per set of deviating settings, titled by the settings."""
    main = pd.Series([run.backbone for run in runs]).value_counts().index[0]
    plain = [run for run in runs if run.backbone == main and not run.deviations]
    if not plain:
        return []
    groups: dict[tuple[str, ...], dict[str, list[Run]]] = {}
    for run in (run for run in runs if run.variant != plain[0].variant):
        # the settings it deviates in: from its backbone's defaults, and the backbone (or model) if not the main one
        keys = tuple(sorted(run.deviations))
        if run.backbone != main:
            keys = ("backbone" if run.model == "patchcore" else "model", *keys)
        if is_finetuned(run.config.get("backbone") or {}):
            keys = ("fine-tuned backbone", *keys[1:])
        groups.setdefault(keys, {}).setdefault(run.variant, []).append(run)
    comparisons = []
    for keys, variants in sorted(groups.items()):
        # numbers in names by value (train_limit=1, 2, 16), never as text (1, 16, 2)
        arms = [Arm.of(BASELINE, plain, frame),
                *(Arm.of(v, variants[v], frame) for v in sorted(variants, key=natural_key))]
        title = ", ".join(keys)
        sweep = keys[0] if len(keys) == 1 and _is_sweep(arms, keys[0]) else None
        name = "_".join(keys).replace(".", "_").replace(" ", "_").replace("-", "_")
        comparisons.append(Comparison(name, title, arms, sweep=sweep, dataset=runs[0].dataset))
    return comparisons


def categories_of(comparison: Comparison) -> list[str]:
    return sorted(set().union(*(set(arm.rows["category"]) for arm in comparison.arms)))
