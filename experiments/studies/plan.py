"""The study's plan: a ``Study`` (experiments/studies/comparison.py) -> the list of runs, each a typed
``RunSpec`` with its command line and folder, in run order (per dataset: its baseline, then each of its
comparisons), into ``<study>/<dataset>/<comparison>/<arm>[_seed<s>]/``.

On each dataset the baseline arm runs once per seed and is the reference of that dataset's comparisons.
Identical runs (the same overrides) are run once and shared between comparisons. An arm with a fine-tuned
backbone gets a ``finetune.py`` run per seed first, its checkpoints under ``<study>/<dataset>/checkpoints/``
(so categories of two datasets never share a file), in a folder of their own when it changes fine-tuning
settings; the same fine-tuning run asked for by two comparisons runs once. A ``selection`` comparison gets one
``selection.py`` job per seed (``select``, experiments/studies/selection_kind.py) besides its candidates' runs,
which do not wait for it. Each comparison's record names the arm of each of its jobs (``job_arms``): a run shared
with another comparison keeps its own arm name in each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from experiments.harness.overrides import override_key
from experiments.studies.comparison import (
    BASELINE,
    DEFAULT_STEPS,
    STEPS,
    Arm,
    Comparison,
    Study,
    StudyConfigError,
    StudyDataset,
    WeightsCheck,
    load_study,
    slug,
    value_text,
)

__all__ = ["Plan", "RunSpec", "StudyConfigError", "build_plan", "check_extractor", "load_study", "merge_overrides"]


@dataclass
class RunSpec:
    """One run of the study: PatchCore (``main.py``) or fine-tuning (``finetune.py``); the runner, the
    manifest and the report know a run by this."""

    id: str                       # <dataset>/<comparison>/<arm>[_seed<s>], unique in the study
    kind: str                     # "patchcore" | "finetune" | "select"
    dataset: str
    comparison: str
    arm: str
    seed: int
    overrides: list[str]
    folder: Path                  # the run folder (hydra.run.dir)
    needs: list[str] = field(default_factory=list)   # ids of runs that must be done first
    checkpoints: list[Path] = field(default_factory=list)  # finetune: the files it produces

    def command(self, python: str = "python") -> list[str]:
        return [python, SCRIPTS[self.kind], *self.overrides, f"hydra.run.dir={self.folder}"]


SCRIPTS = {"patchcore": "experiments/main.py", "finetune": "experiments/finetune.py",
           "select": "experiments/selection.py"}


@dataclass
class Plan:
    study: Study
    folder: Path
    categories: dict[str, list[str]]  # dataset -> its categories
    jobs: list[RunSpec]
    # <dataset>/<comparison> -> Comparison.record() + {"jobs": [the baseline's first], "job_arms": {job: arm}}
    comparisons: dict[str, dict]

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def datasets(self) -> dict[str, dict]:
        """What the manifest says of each dataset: its categories, overrides and comparisons."""
        return {d.name: {"category": d.category, "categories": self.categories[d.name], "overrides": list(d.overrides),
                         "finetune_overrides": list(d.finetune_overrides),
                         "comparisons": [c.name for c in d.comparisons]} for d in self.study.datasets}

    @property
    def config(self) -> dict:
        return self.study.config

    @property
    def skipped(self) -> list[dict]:
        """The arms that cannot run here, with the reason (listed in the manifest and the paper, never dropped)."""
        return [{"dataset": d.name, "comparison": c.name, "arm": arm, "reason": reason}
                for d in self.study.datasets for c in d.comparisons for arm, reason in c.skipped]


def merge_overrides(*groups: list[str] | tuple[str, ...]) -> list[str]:
    """Overrides in order, a later one replacing an earlier one of the same key (Hydra refuses repeats)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            key = override_key(override)
            merged.pop(key, None)
            merged[key] = override
    return list(merged.values())


def at_default_length(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``overrides`` without a ``method.train.max_steps`` equal to the default (conf/method/train/default.yaml):
    after ``merge_overrides`` it is the only one of its key, so dropping it leaves the same length."""
    return [o for o in overrides if o != f"{STEPS}={DEFAULT_STEPS}"]


def check_extractor(name: str, dataset: str) -> str | None:
    """None when backbone ``name`` has pretrained weights on this machine, else why not (built here, once)."""
    from hydra import compose, initialize_config_dir

    from experiments.harness.backbones import backbone_problem, unavailable
    from experiments.studies.comparison import CONF_STUDY

    try:
        with initialize_config_dir(config_dir=str(CONF_STUDY.parent), version_base="1.3"):
            cfg = compose("config", overrides=[f"backbone={name}", f"dataset={dataset}"])
    except Exception as error:  # an unknown config: the reason is the message
        return unavailable(error)
    if cfg.backbone.get("pretrained", True) in (None, False):
        return "its config has random weights (backbone.pretrained): never part of a comparison"
    return backbone_problem(cfg.backbone)


class _Planner:
    """Turns a study into runs, sharing identical ones."""

    def __init__(self, study: Study, folder: Path, categories: dict[str, list[str]]) -> None:
        self.study, self.folder, self.categories = study, folder, categories
        self.jobs: dict[str, RunSpec] = {}
        self.by_overrides: dict[tuple, str] = {}
        self.roots: dict[Path, tuple] = {}  # checkpoint root -> the fine-tuning overrides that write it
        self.finetunes: dict[tuple, tuple[str, list[str]]] = {}  # fine-tuning identity -> (job, its use)

    def common(self, dataset: StudyDataset) -> list[str]:
        """The study's and the dataset's overrides of every PatchCore run on ``dataset``, paths filled in."""
        where = self.folder / dataset.name
        return [o.replace("${study_dir}", str(self.folder)).replace("${dataset_dir}", str(where))
                for o in (*self.study.common, *dataset.overrides)]

    def patchcore(self, dataset: StudyDataset, comparison: str, arm: str, overrides: list[str] | tuple[str, ...],
                  seed: int, multi_seed: bool, needs: list[str] | None = None) -> str:
        study = self.study
        base = [f"dataset={dataset.name}", f"category={value_text(dataset.category)}", f"backbone={study.backbone}",
                "force=true", f"logger={study.logger}", "progress=false"]
        arm_overrides = merge_overrides(base, self.common(dataset), overrides, [f"seed={seed}"])
        key = tuple(sorted(arm_overrides))
        if key in self.by_overrides:  # the same run in another comparison: run once, share it
            return self.by_overrides[key]
        job_id = f"{dataset.name}/{comparison}/{slug(arm)}" + (f"_seed{seed}" if multi_seed else "")
        name = study.name
        tracking = [f"logger.group={name}", f"logger.job_type={comparison}",  # W&B: grouped by study, comparison
                    f"logger.tags=[study:{name},{slug(dataset.name)},{slug(comparison)},{slug(arm)}]"]
        tracking = tracking if study.logger == "wandb" else []
        save = ["save_model=true"] if seed in study.save_model_seeds else []
        self.jobs[job_id] = RunSpec(job_id, "patchcore", dataset.name, comparison, arm, seed,
                                    merge_overrides(arm_overrides, save, tracking), self.folder / job_id,
                                    list(needs or []))
        self.by_overrides[key] = job_id
        return job_id

    def finetune(self, dataset: StudyDataset, comparison: str, arm: Arm, seed: int) -> tuple[str, list[str]]:
        """The fine-tuning run of ``arm`` for ``seed`` on ``dataset`` and the overrides that use its checkpoints;
        the same fine-tuning asked for twice (by two comparisons, or a curve point of the default length and
        the method's defaults) is one run."""
        study, method = self.study, arm.finetune.method
        extra = at_default_length(arm.finetune.overrides)  # names the checkpoint folder: not the default's
        settings = at_default_length(merge_overrides(study.finetune_overrides, dataset.finetune_overrides,
                                                     arm.finetune.overrides))
        key = ("finetune", dataset.name, method, seed, *sorted(settings))
        if key in self.finetunes:
            return self.finetunes[key]
        # a method with its defaults: <dataset>/checkpoints/seed<s>; a fine-tuning setting: a folder of its own
        # (named by the arm; by comparison and arm when another arm of that name fine-tunes otherwise)
        checkpoints = self.folder / dataset.name / "checkpoints"
        root = checkpoints / (slug(arm.name) if extra else "") / f"seed{seed}"
        claim = tuple(sorted(settings))  # methods write apart (<root>/<method>/): a root is claimed by settings
        if self.roots.setdefault(root, claim) != claim:
            root = checkpoints / f"{slug(comparison)}_{slug(arm.name)}" / f"seed{seed}"
            self.roots.setdefault(root, claim)
        overrides = merge_overrides(
            [f"method={method}", f"backbone={study.backbone}", f"dataset={dataset.name}",
             f"category={value_text(dataset.category)}", f"checkpoint_dir={root}", f"method.train.seed={seed}",
             "progress=false"], settings)
        use = ["backbone=finetuned", f"backbone.method={method}", f"backbone.base={study.backbone}",
               f"backbone.checkpoint={root / method / study.backbone / '${category}.pt'}"]
        job_id = f"{dataset.name}/{comparison}/finetune_{slug(arm.name)}" + \
            (f"_seed{seed}" if len(study.seeds) > 1 else "")
        files = [root / method / study.backbone / f"{c}.pt" for c in self.categories[dataset.name]]
        self.jobs[job_id] = RunSpec(job_id, "finetune", dataset.name, comparison, f"{arm.name} (fine-tuning)", seed,
                                    overrides, self.folder / job_id, checkpoints=files)
        self.finetunes[key] = (job_id, use)
        return job_id, use

    def select(self, dataset: StudyDataset, comparison: Comparison, seed: int, multi_seed: bool) -> str:
        """The ``selection.py`` job of a selection comparison for ``seed``: the PatchCore runs' study and dataset
        overrides as its base (the candidates' own base), the space less what the dataset fixes."""
        selection = comparison.selection
        overrides = merge_overrides(
            [f"dataset={dataset.name}", f"category={value_text(dataset.category)}",
             f"backbone={self.study.backbone}", "progress=false"], self.common(dataset),
            [f"select/space={selection.space}", *selection.dropped, *selection.overrides],
            [f"seed={seed}", f"select.seed={seed}"])
        key = ("select", *sorted(overrides))
        if key in self.by_overrides:  # the same selection asked for by another comparison: run once
            return self.by_overrides[key]
        job_id = f"{dataset.name}/{comparison.name}/select" + (f"_seed{seed}" if multi_seed else "")
        self.jobs[job_id] = RunSpec(job_id, "select", dataset.name, comparison.name, "selection", seed, overrides,
                                    self.folder / job_id)
        self.by_overrides[key] = job_id
        return job_id

    def plan(self) -> Plan:
        study, comparisons = self.study, {}
        for dataset in study.datasets:
            baseline = [self.patchcore(dataset, BASELINE, BASELINE, [], s, len(study.seeds) > 1) for s in study.seeds]
            for comparison in dataset.comparisons:
                ids = list(baseline)
                arms = dict.fromkeys(baseline, BASELINE)  # job -> its arm here (the first arm that asked for it)
                if comparison.selection is not None:
                    seeds = (comparison.arms[0].seeds if comparison.arms else None) or study.seeds
                    ids += [self.select(dataset, comparison, seed, len(seeds) > 1) for seed in seeds]
                tuned = {(arm.name, seed): self.finetune(dataset, comparison.name, arm, seed)  # fine-tuning first
                         for arm in comparison.arms if arm.finetune is not None for seed in arm.seeds or study.seeds}
                for arm in comparison.arms:
                    seeds = arm.seeds or study.seeds
                    multi = len(seeds) > 1 or (arm.finetune is not None and len(study.seeds) > 1)
                    for seed in seeds:
                        need, overrides = tuned.get((arm.name, seed), (None, list(arm.overrides)))
                        ids.append(self.patchcore(dataset, comparison.name, arm.name, overrides, seed, multi,
                                                  [need] if need else []))
                        arms.setdefault(ids[-1], arm.name)
                comparisons[f"{dataset.name}/{comparison.name}"] = {**comparison.record(dataset.name), "jobs": ids,
                                                                    "job_arms": arms}
        return Plan(study, self.folder, self.categories, list(self.jobs.values()), comparisons)


def build_plan(config: dict | Study, out_root: Path, categories: dict[str, list[str]],
               check: WeightsCheck = check_extractor) -> Plan:
    """Every run of the study (in run order, per dataset: baseline, then each comparison) and the skipped arms;
    ``categories``: each dataset's category names (experiments/study.py resolves them)."""
    study = config if isinstance(config, Study) else Study.from_config(config, check)
    missing = [d.name for d in study.datasets if d.name not in categories]
    if missing:
        raise StudyConfigError(f"{study.source}: no categories resolved for dataset(s) {', '.join(missing)}")
    # absolute once, from the caller's working directory: every job's folder, cache and checkpoints mean the
    # same place to the runner and to the jobs, wherever they run
    return _Planner(study, Path(os.path.abspath(out_root)) / study.name, categories).plan()
