"""Runs in, comparisons out: the first stage of the one report pipeline (runs -> comparisons -> document ->
renderers), shared by the paper (paper.py) and the run digest (digest.py).

A comparison is a baseline arm and the arms measured against it. A study's comparisons, titles and order are
its manifest's (``study.json``, written by experiments/study.py from conf/study/*.yaml, the one place a
comparison is declared); arms that could not run (no weights, a failed or unfinished job) are kept with the
reason. Runs that are not a study (a plain multirun sweep) are compared generically: the baseline is the
most common backbone's variant without deviations (experiments/reporting/variants.py), and every other
variant joins the comparison of the settings it deviates in, titled by those settings (a fine-tuned backbone,
``extensions.checkpoint.is_finetuned``, is its own comparison). Statistics: stats.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.reporting.data import Run, discover, drop_repeats, select, tidy
from experiments.reporting.variants import label_variants
from extensions.checkpoint import is_finetuned

BASELINE = "baseline"


@dataclass
class Arm:
    name: str
    rows: pd.DataFrame            # the tidy rows (data.tidy) of its runs
    runs: list[Run]

    @property
    def seeds(self) -> list:
        return sorted(self.rows["seed"].dropna().unique().tolist())


@dataclass
class Comparison:
    name: str
    title: str
    arms: list[Arm]                                       # the baseline first
    missing: list[tuple[str, str]] = field(default_factory=list)  # (arm, why it is not in the comparison)
    sweep: str | None = None                              # the swept setting of a sweep

    @property
    def baseline(self) -> Arm:
        return self.arms[0]

    @property
    def others(self) -> list[Arm]:
        return self.arms[1:]


@dataclass
class Inputs:
    """What both documents are made from: the runs read once, their tidy rows, the runs left out (and why),
    the report's dataset, the study manifest (None for plain runs) and the comparisons."""

    run_dirs: list[str]
    runs: list[Run]
    frame: pd.DataFrame
    left_out: list[dict]
    dataset: str | None
    manifest: dict | None
    comparisons: list[Comparison]


def load(run_dirs: list[str | Path], dataset: str | None = None) -> Inputs:
    """Discover, select (complete, on one dataset, newest of duplicates), label and tabulate the runs below
    ``run_dirs``, and find their comparisons."""
    run_dirs = [str(d) for d in run_dirs]
    runs, broken = discover([Path(d) for d in run_dirs])
    included, excluded, dataset = select(runs, dataset)
    label_variants(included)
    left_out = [{"run_dir": str(run.folder), "reason": why} for run, why in excluded]
    left_out += [{"run_dir": str(folder), "reason": why} for folder, why in broken]
    frame, repeats = drop_repeats(tidy(included))
    left_out += repeats
    if not frame.empty:
        included = [run for run in included if str(run.folder) in set(frame["run_dir"])]
    manifest = find_manifest(run_dirs)
    comparisons = (from_manifest(manifest, included, frame) if manifest else infer(included, frame)) if included \
        else []
    return Inputs(run_dirs, included, frame, left_out, dataset, manifest, comparisons)


def find_manifest(run_dirs: list[str]) -> dict | None:
    """The study manifest of the first run folder that is a study (holds study.json)."""
    for folder in run_dirs:
        path = Path(folder) / "study.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                return None
    return None


def _resolved(path: str | Path) -> str:
    return str(Path(path).resolve())

def from_manifest(manifest: dict, runs: list[Run], frame: pd.DataFrame) -> list[Comparison]:
    """The study's comparisons over the runs the report includes (missing arms kept with the reason)."""
    by_folder = {_resolved(run.folder): run for run in runs}
    jobs = {row["id"]: row for row in manifest.get("jobs", [])}
    specs = (manifest.get("config") or {}).get("comparisons") or {}
    comparisons = []
    for name, entry in (manifest.get("comparisons") or {}).items():
        members: dict[str, list[Run]] = {}
        problems: dict[str, list[str]] = {}
        for job_id in entry.get("jobs", []):
            job = jobs.get(job_id)
            if job is None or job["kind"] != "patchcore":
                continue
            run = by_folder.get(_resolved(job["folder"]))
            if run is None:
                why = job.get("status", "not run")
                why = {"pending": "not run yet", "running": "interrupted"}.get(why, why)
                problems.setdefault(job["arm"], []).append(f"seed {job['seed']}: {why}")
            else:
                members.setdefault(job["arm"], []).append(run)
        arms = []
        for arm in entry.get("arms", []):
            if arm in members:
                folders = {str(run.folder) for run in members[arm]}
                arms.append(Arm(arm, frame[frame["run_dir"].isin(folders)], members[arm]))
        missing = [(arm, "; ".join(why)) for arm, why in problems.items()]
        missing += [(row["arm"], row["reason"]) for row in manifest.get("skipped", []) if row["comparison"] == name]
        if not arms or arms[0].name != BASELINE:
            missing.insert(0, (BASELINE, "the baseline has no complete run"))
            arms = []
        spec = specs.get(name) or {}
        comparisons.append(Comparison(name, entry.get("title", name), arms, missing,
                                      spec.get("sweep") if isinstance(spec, dict) else None))
    return comparisons


def deviated(run: Run, main: str) -> tuple[str, ...]:
    """The settings a run deviates in from the baseline: its deviations from its backbone's defaults, plus
    ``backbone`` (or ``model``, for another model than PatchCore) when that is not the main one."""
    keys = tuple(sorted(run.deviations))
    if run.backbone == main:
        return keys
    return ("backbone" if run.model == "patchcore" else "model", *keys)


def _is_sweep(arms: list[Arm], key: str) -> bool:
    """A numeric or list-valued setting (coreset.ratio, dataset.train_limit, backbone.layers) is drawn as a
    sweep: its value on the x axis; a choice between names (a distance, a class) is not."""
    values = [setting(arm.runs[0].config, key) for arm in arms]
    return all(v is None or isinstance(v, list) or (isinstance(v, (int, float)) and not isinstance(v, bool))
               for v in values) and any(v is not None for v in values)


def setting(config: dict, key: str):
    """The value of a dotted key in a (results.json) config, None when absent."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def infer(runs: list[Run], frame: pd.DataFrame) -> list[Comparison]:
    """Comparisons of runs not made by a study: one per set of deviating settings, titled by the settings."""
    main = pd.Series([run.backbone for run in runs]).value_counts().index[0]
    plain = [run for run in runs if run.backbone == main and not run.deviations]
    if not plain:
        return []
    base_variant = plain[0].variant
    groups: dict[tuple[str, ...], dict[str, list[Run]]] = {}
    for run in runs:
        if run.variant != base_variant:
            keys = deviated(run, main)
            if is_finetuned(run.config.get("backbone") or {}):
                keys = ("fine-tuned backbone", *keys[1:])
            groups.setdefault(keys, {}).setdefault(run.variant, []).append(run)

    def arm(label: str, members: list[Run]) -> Arm:
        return Arm(label, frame[frame["variant"] == members[0].variant], members)

    comparisons = []
    for keys, variants in sorted(groups.items()):
        arms = [arm(BASELINE, plain), *(arm(v, members) for v, members in sorted(variants.items()))]
        title = ", ".join(keys)
        sweep = keys[0] if len(keys) == 1 and _is_sweep(arms, keys[0]) else None
        name = "_".join(keys).replace(".", "_").replace(" ", "_").replace("-", "_")
        comparisons.append(Comparison(name, title, arms, sweep=sweep))
    return comparisons


def categories_of(comparison: Comparison) -> list[str]:
    return sorted(set().union(*(set(arm.rows["category"]) for arm in comparison.arms)))
