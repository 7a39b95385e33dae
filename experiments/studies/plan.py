"""The study's plan: a ``Study`` (experiments/studies/comparison.py) -> the list of runs, each a typed
``RunSpec`` with its command line and folder, in run order (the baseline, then each comparison).

The baseline arm runs once per seed and is the reference of every comparison. Identical runs (the same
overrides) are run once and shared between comparisons. An arm with a fine-tuned backbone gets a
``finetune.py`` run per seed first, with checkpoints of its own when it changes fine-tuning settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from experiments.studies.comparison import (
    BASELINE,
    Arm,
    Study,
    StudyConfigError,
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

    id: str                       # <comparison>/<arm>[_seed<s>], unique in the study
    kind: str                     # "patchcore" | "finetune"
    comparison: str
    arm: str
    seed: int
    overrides: list[str]
    folder: Path                  # the run folder (hydra.run.dir)
    needs: list[str] = field(default_factory=list)   # ids of runs that must be done first
    checkpoints: list[Path] = field(default_factory=list)  # finetune: the files it produces

    def command(self, python: str = "python") -> list[str]:
        script = "experiments/main.py" if self.kind == "patchcore" else "experiments/finetune.py"
        return [python, script, *self.overrides, f"hydra.run.dir={self.folder}"]


@dataclass
class Plan:
    study: Study
    folder: Path
    categories: list[str]
    jobs: list[RunSpec]
    comparisons: dict[str, dict]  # name -> Comparison.record() + {"jobs": [ids, the baseline's first]}

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def dataset(self) -> str:
        return self.study.dataset

    @property
    def config(self) -> dict:
        return self.study.config

    @property
    def skipped(self) -> list[dict]:
        """The arms that cannot run here, with the reason (listed in the manifest and the paper, never dropped)."""
        return [{"comparison": c.name, "arm": arm, "reason": reason}
                for c in self.study.comparisons for arm, reason in c.skipped]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: list[str] | tuple[str, ...]) -> list[str]:
    """Overrides in order, a later one replacing an earlier one of the same key (Hydra refuses repeats)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            key = override_key(override)
            merged.pop(key, None)
            merged[key] = override
    return list(merged.values())


def check_extractor(name: str, dataset: str) -> str | None:
    """None when backbone ``name`` has pretrained weights on this machine, else why not (built here, once)."""
    from hydra import compose, initialize_config_dir

    from experiments.harness.components import build
    from experiments.studies.comparison import CONF_STUDY

    try:
        with initialize_config_dir(config_dir=str(CONF_STUDY.parent), version_base="1.3"):
            cfg = compose("config", overrides=[f"backbone={name}", f"dataset={dataset}"])
        if cfg.backbone.get("pretrained", True) in (None, False):
            return "its config has random weights (backbone.pretrained): never part of a comparison"
        build(cfg.backbone)
    except Exception as error:  # missing weights, offline hub, unknown config: the reason is the message
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"weights not available: {type(error).__name__}: {first}"[:400]
    return None


class _Planner:
    """Turns a study into runs, sharing identical ones."""

    def __init__(self, study: Study, folder: Path, categories: list[str]) -> None:
        self.study, self.folder, self.categories = study, folder, categories
        self.category = value_text(study.category)
        self.common = [o.replace("${study_dir}", str(folder)) for o in study.common]
        self.base = [f"dataset={study.dataset}", f"category={self.category}", f"backbone={study.backbone}",
                     "force=true", f"logger={study.logger}", "progress=false"]
        self.jobs: dict[str, RunSpec] = {}
        self.by_overrides: dict[tuple, str] = {}

    def patchcore(self, comparison: str, arm: str, overrides: list[str] | tuple[str, ...], seed: int,
                  multi_seed: bool, needs: list[str] | None = None) -> str:
        arm_overrides = merge_overrides(self.base, self.common, overrides, [f"seed={seed}"])
        key = tuple(sorted(arm_overrides))
        if key in self.by_overrides:  # the same run in another comparison: run once, share it
            return self.by_overrides[key]
        job_id = f"{comparison}/{slug(arm)}" + (f"_seed{seed}" if multi_seed else "")
        name = self.study.name
        tracking = [f"logger.group={name}", f"logger.job_type={comparison}",  # W&B: grouped by study, comparison
                    f"logger.tags=[study:{name},{slug(comparison)},{slug(arm)}]"]
        tracking = tracking if self.study.logger == "wandb" else []
        save = ["save_model=true"] if seed in self.study.save_model_seeds else []
        self.jobs[job_id] = RunSpec(job_id, "patchcore", comparison, arm, seed,
                                    merge_overrides(arm_overrides, save, tracking), self.folder / job_id,
                                    list(needs or []))
        self.by_overrides[key] = job_id
        return job_id

    def finetune(self, comparison: str, arm: Arm, seed: int) -> tuple[str, list[str]]:
        """The fine-tuning run of ``arm`` for ``seed`` and the overrides that use its checkpoints."""
        study, method, extra = self.study, arm.finetune.method, list(arm.finetune.overrides)
        # a method with its defaults: checkpoints/seed<s>; a fine-tuning setting: a folder of its own
        root = self.folder / "checkpoints" / (slug(arm.name) if extra else "") / f"seed{seed}"
        job_id = f"{comparison}/finetune_{slug(arm.name)}" + (f"_seed{seed}" if len(study.seeds) > 1 else "")
        overrides = merge_overrides(
            [f"method={method}", f"backbone={study.backbone}", f"dataset={study.dataset}", f"category={self.category}",
             f"checkpoint_dir={root}", f"method.train.seed={seed}", "progress=false"],
            study.finetune_overrides, extra)
        files = [root / method / study.backbone / f"{c}.pt" for c in self.categories]
        self.jobs[job_id] = RunSpec(job_id, "finetune", comparison, f"{arm.name} (fine-tuning)", seed, overrides,
                                    self.folder / job_id, checkpoints=files)
        checkpoint = root / method / study.backbone / "${category}.pt"
        return job_id, ["backbone=finetuned", f"backbone.method={method}", f"backbone.base={study.backbone}",
                        f"backbone.checkpoint={checkpoint}"]

    def plan(self) -> Plan:
        study = self.study
        baseline = [self.patchcore(BASELINE, BASELINE, [], s, len(study.seeds) > 1) for s in study.seeds]
        comparisons = {}
        for comparison in study.comparisons:
            ids = list(baseline)
            tuned = {(arm.name, seed): self.finetune(comparison.name, arm, seed)  # fine-tuning runs first
                     for arm in comparison.arms if arm.finetune is not None for seed in study.seeds}
            for arm in comparison.arms:
                seeds = arm.seeds or study.seeds
                multi = len(seeds) > 1 or (arm.finetune is not None and len(study.seeds) > 1)
                for seed in seeds:
                    need, overrides = tuned.get((arm.name, seed), (None, list(arm.overrides)))
                    ids.append(self.patchcore(comparison.name, arm.name, overrides, seed, multi,
                                              [need] if need else []))
            comparisons[comparison.name] = {**comparison.record(), "jobs": ids}
        return Plan(study, self.folder, self.categories, list(self.jobs.values()), comparisons)


def build_plan(config: dict | Study, out_root: Path, categories: list[str],
               check: WeightsCheck = check_extractor) -> Plan:
    """Every run of the study (in run order: baseline, then each comparison) and the skipped arms."""
    study = config if isinstance(config, Study) else Study.from_config(config, check)
    # absolute once, from the caller's working directory: every job's folder, cache and checkpoints mean the
    # same place to the runner and to the jobs, wherever they run
    return _Planner(study, Path(os.path.abspath(out_root)) / study.name, categories).plan()
