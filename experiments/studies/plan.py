"""The study's plan: conf/study/<name>.yaml -> the list of jobs (fine-tuning and PatchCore runs), each with
its command line and folder, and the arms that cannot run here with the reason (listed, never dropped).

A study config names a baseline backbone, seeds, overrides shared by every run and a set of comparisons.
Each comparison is one of: ``arms`` (name -> overrides, optionally ``seeds``), ``sweep`` + ``values`` (one
arm per value; ``also`` adds settings that go with each value), ``extractors`` (other backbones: only
those whose pretrained weights are on this machine) or ``methods`` (fine-tuned baseline backbones: a
``finetune.py`` job per method and seed, then PatchCore on its checkpoints; a list of conf/method names, or
arm name -> ``{method, overrides}`` for fine-tuning settings, e.g. a sweep of ``method.train.l2sp_weight``). The
baseline arm (the baseline backbone with conf/ defaults) is the reference of every comparison and runs once per seed.
Identical runs (the same overrides) are run once and shared between comparisons.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

CONF_STUDY = Path(__file__).resolve().parents[2] / "conf" / "study"
BASELINE = "baseline"
COMPARISON_KINDS = ("arms", "sweep", "extractors", "methods")


class StudyConfigError(ValueError):
    """A study config that cannot be planned; the message names the file and the setting."""


@dataclass
class Job:
    """One subprocess of the study: a PatchCore run (``main.py``) or a fine-tuning run (``finetune.py``)."""

    id: str                       # <comparison>/<arm>[_seed<s>], unique in the study
    kind: str                     # "patchcore" | "finetune"
    comparison: str
    arm: str
    seed: int
    overrides: list[str]
    folder: Path                  # the run folder (hydra.run.dir)
    needs: list[str] = field(default_factory=list)   # ids of jobs that must be done first
    checkpoints: list[Path] = field(default_factory=list)  # finetune: the files it produces

    def command(self, python: str = "python") -> list[str]:
        script = "experiments/main.py" if self.kind == "patchcore" else "experiments/finetune.py"
        return [python, script, *self.overrides, f"hydra.run.dir={self.folder}"]


@dataclass
class Plan:
    name: str
    folder: Path
    dataset: str
    categories: list[str]
    jobs: list[Job]
    comparisons: dict[str, dict]  # name -> {"title", "arms": [arm names, baseline first], "jobs": [ids]}
    skipped: list[dict]           # {"comparison", "arm", "reason"}
    config: dict


def load_study(name_or_path: str) -> dict:
    """conf/study/<name>.yaml (or a path to a YAML file) as a plain dict."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_STUDY / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONF_STUDY.glob("*.yaml")))
        raise StudyConfigError(f"study {name_or_path!r}: no file {path} (known studies: {known})")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    config["source"] = str(path)
    return config


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: list[str]) -> list[str]:
    """Overrides in order, a later one replacing an earlier one of the same key (Hydra refuses repeats)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            key = override_key(override)
            merged.pop(key, None)
            merged[key] = override
    return list(merged.values())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(text)).strip("_") or "x"


def _value_text(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def _arm_spec(comparison: str, arm: str, spec, source: str) -> tuple[list[str], list[int] | None]:
    if isinstance(spec, list):
        return [str(o) for o in spec], None
    if isinstance(spec, dict) and "overrides" in spec:
        seeds = spec.get("seeds")
        return [str(o) for o in spec["overrides"]], ([int(s) for s in seeds] if seeds is not None else None)
    raise StudyConfigError(f"{source}: comparisons.{comparison}.arms.{arm}: give a list of overrides or "
                           "{overrides: [...], seeds: [...]}")


def check_extractor(name: str, dataset: str) -> str | None:
    """None when backbone ``name`` has pretrained weights on this machine, else why not (built here, once)."""
    from hydra import compose, initialize_config_dir

    from experiments.harness.components import build

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


def finetuned_backbone(method: str, base: str, checkpoint: Path) -> list[str]:
    """PatchCore's overrides for ``method``'s checkpoints of ``base``: conf/backbone/finetuned.yaml serves every
    conf/method/<name>.yaml, so a method needs no conf/backbone file of its own."""
    return ["backbone=finetuned", f"backbone.method={method}", f"backbone.base={base}",
            f"backbone.checkpoint={checkpoint}"]


def build_plan(config: dict, out_root: Path, categories: list[str],
               check: Callable[[str, str], str | None] = check_extractor) -> Plan:
    """Every job of the study (in run order: baseline, then each comparison) and the skipped arms."""
    source = config.get("source", "study config")
    for key in ("name", "dataset", "backbone", "seeds", "comparisons"):
        if key not in config:
            raise StudyConfigError(f"{source}: the key {key!r} is missing")
    name, dataset, backbone = str(config["name"]), str(config["dataset"]), str(config["backbone"])
    folder = out_root / name
    seeds = [int(s) for s in config["seeds"]]
    if not seeds:
        raise StudyConfigError(f"{source}: seeds is empty: give at least one seed")
    save_seeds = {int(s) for s in config.get("save_model_seeds") or []}
    category = config.get("category", "all")
    category_text = _value_text(category)
    common = [str(o).replace("${study_dir}", str(folder)) for o in config.get("common") or []]
    logger = str(config.get("logger", "none"))
    base = [f"dataset={dataset}", f"category={category_text}", f"backbone={backbone}", "force=true",
            f"logger={logger}", "progress=false"]
    jobs: dict[str, Job] = {}
    by_overrides: dict[tuple, str] = {}
    comparisons: dict[str, dict] = {}
    skipped: list[dict] = []

    def patchcore(comparison: str, arm: str, overrides: list[str], seed: int, multi_seed: bool,
                  needs: list[str] | None = None) -> str:
        arm_overrides = merge_overrides(base, common, overrides, [f"seed={seed}"])
        key = tuple(sorted(arm_overrides))
        if key in by_overrides:  # the same run in another comparison: run once, share it
            return by_overrides[key]
        job_id = f"{comparison}/{_slug(arm)}" + (f"_seed{seed}" if multi_seed else "")
        tracking = [f"logger.group={name}", f"logger.job_type={comparison}",
                    f"logger.tags=[study:{name},{_slug(comparison)},{_slug(arm)}]"] if logger == "wandb" else []
        save = ["save_model=true"] if seed in save_seeds else []
        job = Job(job_id, "patchcore", comparison, arm, seed, merge_overrides(arm_overrides, save, tracking),
                  folder / job_id, list(needs or []))
        jobs[job_id] = job
        by_overrides[key] = job_id
        return job_id

    baseline_ids = [patchcore(BASELINE, BASELINE, [], s, len(seeds) > 1) for s in seeds]
    for comparison, spec in (config.get("comparisons") or {}).items():
        if not isinstance(spec, dict) or not any(k in spec for k in COMPARISON_KINDS):
            raise StudyConfigError(f"{source}: comparisons.{comparison}: give one of {', '.join(COMPARISON_KINDS)}")
        entry = {"title": spec.get("title", comparison), "arms": [BASELINE], "jobs": list(baseline_ids)}
        arms: list[tuple[str, list[str], list[int], list[str]]] = []  # (arm, overrides, seeds, needs per seed)
        if "arms" in spec:
            for arm, arm_spec in spec["arms"].items():
                overrides, arm_seeds = _arm_spec(comparison, arm, arm_spec, source)
                arms.append((arm, overrides, arm_seeds or seeds, []))
        elif "sweep" in spec:
            key, values, also = str(spec["sweep"]), list(spec.get("values") or []), spec.get("also") or {}
            for other, linked in also.items():
                if len(linked) != len(values):
                    raise StudyConfigError(f"{source}: comparisons.{comparison}.also.{other}: give one value per "
                                           f"sweep value ({len(values)})")
            for i, value in enumerate(values):
                overrides = [f"{key}={_value_text(value)}", *(f"{o}={_value_text(v[i])}" for o, v in also.items())]
                arms.append((f"{key.rsplit('.', 1)[-1]}={_value_text(value)}", overrides, seeds, []))
        elif "extractors" in spec:
            for extractor in spec["extractors"]:
                if extractor == backbone:
                    continue
                reason = check(str(extractor), dataset)
                if reason:
                    skipped.append({"comparison": comparison, "arm": str(extractor), "reason": reason})
                else:
                    arms.append((str(extractor), [f"backbone={extractor}"], seeds, []))
        else:
            methods = spec["methods"]
            entries = ([(str(m), {"method": str(m)}) for m in methods] if isinstance(methods, list)
                       else list(methods.items()))
            for arm, method_spec in entries:
                if not isinstance(method_spec, dict) or "method" not in method_spec:
                    raise StudyConfigError(f"{source}: comparisons.{comparison}.methods.{arm}: give "
                                           "{method: <conf/method name>, overrides: [...]}")
                method, extra = str(method_spec["method"]), [str(o) for o in method_spec.get("overrides") or []]
                for seed in seeds:
                    # a method with its defaults: checkpoints/seed<s>; a fine-tuning setting: a folder of its own
                    root = folder / "checkpoints" / (_slug(arm) if extra else "") / f"seed{seed}"
                    job_id = f"{comparison}/finetune_{_slug(arm)}" + (f"_seed{seed}" if len(seeds) > 1 else "")
                    overrides = merge_overrides(
                        [f"method={method}", f"backbone={backbone}", f"dataset={dataset}", f"category={category_text}",
                         f"checkpoint_dir={root}", f"method.train.seed={seed}", "progress=false"],
                        [str(o) for o in config.get("finetune_overrides") or []], extra)
                    files = [root / method / backbone / f"{c}.pt" for c in categories]
                    jobs[job_id] = Job(job_id, "finetune", comparison, f"{arm} (fine-tuning)", seed, overrides,
                                       folder / job_id, checkpoints=files)
                    checkpoint = root / method / backbone / "${category}.pt"
                    arms.append((arm, finetuned_backbone(method, backbone, checkpoint), [seed], [job_id]))
        for arm, overrides, arm_seeds, needs in arms:
            if arm not in entry["arms"]:
                entry["arms"].append(arm)
            multi = len(arm_seeds) > 1 or ("methods" in spec and len(seeds) > 1)
            for seed in arm_seeds:
                entry["jobs"].append(patchcore(comparison, arm, overrides, seed, multi, needs))
        comparisons[comparison] = entry
    return Plan(name, folder, dataset, categories, list(jobs.values()), comparisons, skipped, config)
