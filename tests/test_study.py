"""experiments/study.py's plan and runner with a fake runner: the jobs each comparison makes (and shares),
arms without weights listed as skipped, finished jobs skipped on a re-run, failures and blocked jobs
recorded, the progress line's estimate of the time left."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from experiments.studies.plan import StudyConfigError, build_plan, load_study, merge_overrides
from experiments.studies.runner import MANIFEST, estimate_left, run_plan

CATEGORIES = ["brick", "grass"]
ON = {"textures": CATEGORIES}


def _config(**extra) -> dict:
    config = {"name": "t", "datasets": {"textures": {"category": "[brick,grass]"}}, "backbone": "effnet_lite0",
              "seeds": [0, 1], "save_model_seeds": [0], "common": ["viz.n=1"], "logger": "none",
              "comparisons": {
                  "extractors": {"extractors": ["wrn50", "clip"]},
                  "finetuning": {"methods": ["rotation"]},
                  "baselines": {"arms": {"full bank": {"overrides": ["coreset=none"], "seeds": [0]},
                                         "random bank": ["coreset=random"]}},
                  "coreset_ratio": {"sweep": "coreset.ratio", "values": [0.01]},
                  "image_size": {"sweep": "dataset.image_size", "values": [160], "also": {"dataset.resize": [183]}},
              }}
    config.update(extra)
    return config


def _plan(tmp_path: Path, **extra):
    weights = {"wrn50": "weights not available: WeightsNotFoundError: no file", "clip": None}
    return build_plan(_config(**extra), tmp_path, ON, check=lambda name, dataset: weights[name])


def test_plan_jobs_and_skipped_arms(tmp_path) -> None:
    plan = _plan(tmp_path)
    ids = [job.id for job in plan.jobs]
    assert ids == ["textures/" + i for i in [
        "baseline/baseline_seed0", "baseline/baseline_seed1", "extractors/clip_seed0", "extractors/clip_seed1",
        "finetuning/finetune_rotation_seed0", "finetuning/finetune_rotation_seed1",
        "finetuning/rotation_seed0", "finetuning/rotation_seed1",
        "baselines/full_bank", "baselines/random_bank_seed0", "baselines/random_bank_seed1",
        "coreset_ratio/ratio_0.01_seed0", "coreset_ratio/ratio_0.01_seed1",
        "image_size/image_size_160_seed0", "image_size/image_size_160_seed1"]]
    assert plan.skipped == [{"dataset": "textures", "comparison": "extractors", "arm": "wrn50",
                             "reason": "weights not available: WeightsNotFoundError: no file"}]
    jobs = {job.id.removeprefix("textures/"): job for job in plan.jobs}
    seed0 = jobs["baseline/baseline_seed0"].command("python")
    assert seed0[:2] == ["python", "experiments/main.py"]
    assert {"seed=0", "save_model=true", "viz.n=1", "backbone=effnet_lite0", "category=[brick,grass]",
            f"hydra.run.dir={tmp_path / 't' / 'textures' / 'baseline' / 'baseline_seed0'}"} <= set(seed0)
    assert "save_model=true" not in jobs["baseline/baseline_seed1"].overrides
    finetune = jobs["finetuning/finetune_rotation_seed1"]
    assert finetune.command("python")[1] == "experiments/finetune.py"
    checkpoints = tmp_path / "t" / "textures" / "checkpoints"
    assert {"method=rotation", "method.train.seed=1", f"checkpoint_dir={checkpoints / 'seed1'}"} \
        <= set(finetune.overrides)
    assert finetune.checkpoints == [checkpoints / "seed1" / "rotation" / "effnet_lite0" / f"{c}.pt"
                                    for c in CATEGORIES]
    tuned = jobs["finetuning/rotation_seed1"]
    assert tuned.needs == ["textures/finetuning/finetune_rotation_seed1"]
    assert {"backbone=finetuned", "backbone.method=rotation", "backbone.base=effnet_lite0"} <= set(tuned.overrides)
    assert "backbone=effnet_lite0" not in tuned.overrides
    assert f"backbone.checkpoint={checkpoints}/seed1/rotation/effnet_lite0/${{category}}.pt" in tuned.overrides
    assert {"dataset.image_size=160", "dataset.resize=183"} <= set(jobs["image_size/image_size_160_seed0"].overrides)
    # every comparison is measured against the same baseline runs
    assert all(entry["jobs"][:2] == ["textures/baseline/baseline_seed0", "textures/baseline/baseline_seed1"]
               for entry in plan.comparisons.values())
    assert plan.comparisons["textures/baselines"]["arms"] == ["baseline", "full bank", "random bank"]


def test_identical_runs_are_shared_between_comparisons(tmp_path) -> None:
    config = _config()
    config["comparisons"] = {"a": {"arms": {"ratio": ["coreset.ratio=0.01"]}},
                             "b": {"sweep": "coreset.ratio", "values": [0.01]}}
    plan = build_plan(config, tmp_path, ON, check=lambda *_: None)
    assert [job.id for job in plan.jobs] == ["textures/baseline/baseline_seed0", "textures/baseline/baseline_seed1",
                                             "textures/a/ratio_seed0", "textures/a/ratio_seed1"]
    assert plan.comparisons["textures/b"]["jobs"] == plan.comparisons["textures/a"]["jobs"]


def test_fine_tuning_settings_get_checkpoints_of_their_own(tmp_path) -> None:
    config = _config(seeds=[0])
    config["comparisons"] = {"ft": {"methods": {"rot (l2sp=0)": {"method": "rotation",
                                                                "overrides": ["method.train.l2sp_weight=0.0"]}}}}
    plan = build_plan(config, tmp_path, ON, check=lambda *_: None)
    finetune, tuned = plan.jobs[1], plan.jobs[2]
    root = tmp_path / "t" / "textures" / "checkpoints" / "rot_l2sp_0" / "seed0"
    assert finetune.id == "textures/ft/finetune_rot_l2sp_0" and "method.train.l2sp_weight=0.0" in finetune.overrides
    assert f"checkpoint_dir={root}" in finetune.overrides and finetune.checkpoints[0] == root / "rotation" / \
        "effnet_lite0" / "brick.pt"
    assert tuned.arm == "rot (l2sp=0)" and f"backbone.checkpoint={root}/rotation/effnet_lite0/${{category}}.pt" \
        in tuned.overrides and {"backbone=finetuned", "backbone.method=rotation"} <= set(tuned.overrides)
    config["comparisons"] = {"ft": {"methods": {"bad": ["method.train.lr=1"]}}}
    with pytest.raises(StudyConfigError, match="comparisons.ft.methods.bad"):
        build_plan(config, tmp_path, ON, check=lambda *_: None)


def test_merge_overrides_keeps_the_last_of_each_key() -> None:
    assert merge_overrides(["a=1", "b=2"], ["+a=3", "c=4"]) == ["b=2", "+a=3", "c=4"]


def test_bad_configs_name_the_setting(tmp_path) -> None:
    with pytest.raises(StudyConfigError, match="seeds"):
        build_plan({k: v for k, v in _config().items() if k != "seeds"}, tmp_path, ON)
    bad = _config()
    bad["comparisons"] = {"x": {"values": [1]}}
    with pytest.raises(StudyConfigError, match="comparisons.x"):
        build_plan(bad, tmp_path, ON, check=lambda *_: None)
    with pytest.raises(StudyConfigError, match="known studies: .*default.*quick"):
        load_study("no_such_study")


SHIPPED = {"textures": CATEGORIES, "elpv": ["mono", "poly"]}


def test_the_shipped_studies_plan(tmp_path) -> None:
    for name in ("default", "full", "quick"):
        config = load_study(name)
        plan = build_plan(config, tmp_path, SHIPPED, check=lambda *_: "absent")
        assert plan.jobs and all(job.folder.is_relative_to(tmp_path / name) for job in plan.jobs)
        # a feature cache per dataset
        assert all(f"storage.cache_dir={tmp_path / name / job.dataset}/feature_cache" in job.overrides
                   for job in plan.jobs if job.kind == "patchcore")
        assert {job.dataset for job in plan.jobs} == {"textures", "elpv"}
    full = build_plan(load_study("full"), tmp_path, SHIPPED, check=lambda *_: "absent")
    # >= 3 seeds for everything stochastic; the full bank (no selection) once
    seeds: dict[tuple, set] = {}
    for job in full.jobs:
        seeds.setdefault((job.dataset, job.comparison, job.arm), set()).add(job.seed)
    assert all(len(s) >= 3 for key, s in seeds.items() if key != ("textures", "baselines", "full bank"))
    assert {row["arm"] for row in full.skipped} >= {"clip", "dinov2_vits14", "wrn50"}
    # elpv runs a subset of the comparisons, with its own overrides; the training-length curve on both datasets
    assert full.datasets["elpv"]["comparisons"] == ["finetuning", "training_length", "extractors"]
    assert {key.split("/")[1] for key in full.comparisons if key.startswith("elpv/")} == \
        {"finetuning", "training_length", "extractors"}
    assert all("dataset.train_limit=200" in job.overrides for job in full.jobs if job.dataset == "elpv")
    assert not any("dataset.train_limit=200" in job.overrides for job in full.jobs if job.dataset == "textures")
    for dataset in ("textures", "elpv"):
        curve = full.comparisons[f"{dataset}/training_length"]
        assert curve["sweep"] == "method.train.max_steps" and curve["points"]["baseline"]["value"] == 0
        assert sorted(p["value"] for p in curve["points"].values()) == [0, 40, 40, 200, 200, 1000, 1000]
    # a selection candidate equal to an ablation's run shares that run (k = 3, neighbourhood 5, coreset 1 % and 25 %)
    shared = full.comparisons["textures/selection"]["jobs"]
    assert {f"textures/{run}_seed{s}" for s in (0, 1, 2) for run in (
        "num_neighbors/num_neighbors_3", "patch_size/patch_size_5", "coreset_ratio/ratio_0.01",
        "coreset_ratio/ratio_0.25")} <= set(shared)
    # the CPU study: the fine-tuning question on both datasets, 3 seeds everywhere but the full bank
    default = build_plan(load_study("default"), tmp_path, SHIPPED, check=lambda *_: "absent")
    ablations = {"coreset_ratio", "num_neighbors", "patch_size", "layers"}
    assert set(default.comparisons) == {"textures/finetuning", "textures/baselines", "textures/variants",
                                        "elpv/finetuning", "elpv/training_length",
                                        "elpv/selection"} | {f"textures/{name}" for name in ablations}
    seeds = {}
    for job in default.jobs:
        seeds.setdefault((job.dataset, job.comparison, job.arm), set()).add(job.seed)
    # the paper's ablations, the variants and the selection on one seed (the intervals resample the test images),
    # and the memory-bank and model baselines (the 3-hour budget: docs/experiments.md); the baseline and the
    # fine-tuning question (both datasets, its training-length curve included) on 3
    one_seed = ablations | {"selection", "variants", "baselines"}
    assert {key for key, s in seeds.items() if len(s) < 3} == {key for key in seeds if key[1] in one_seed}
    assert {key for key, s in seeds.items() if len(s) == 3} == {key for key in seeds if key[1] not in one_seed}
    assert {key[1] for key, s in seeds.items() if len(s) == 3} == {"baseline", "finetuning", "training_length"}
    assert all(seeds[key] == {0} for key in seeds if key[1] in one_seed)
    # one select job, on ELPV (textures' is conf/study/selection.yaml's); its coreset axis is dropped (the dataset
    # fixes coreset.ratio)
    selects = [job for job in default.jobs if job.kind == "select"]
    assert [job.dataset for job in selects] == ["elpv"]
    assert not any("coreset.ratio=0.01" in job.overrides for job in default.jobs
                   if job.dataset == "elpv" and job.comparison == "selection")
    curve = default.comparisons["elpv/training_length"]
    assert sorted(p["value"] for p in curve["points"].values()) == [0, 40, 40, 200, 200]
    # the curve's 40-step points are the finetuning comparison's runs (the default length), shared, not re-run
    assert {f"elpv/finetuning/{m}_seed{s}" for m in ("rotation", "cutmix_contrastive") for s in (0, 1, 2)} <= \
        set(curve["jobs"])
    assert not any(job.id.startswith("elpv/training_length/") and "40_steps" in job.id for job in default.jobs)
    # every method with its defaults shares a seed's folder: <root>/<method>/ keeps them apart
    by_id = {job.id: job for job in default.jobs}
    for method in ("rotation", "cutmix_contrastive"):
        assert f"checkpoint_dir={tmp_path / 'default' / 'elpv' / 'checkpoints' / 'seed1'}" in \
            by_id[f"elpv/finetuning/finetune_{method}_seed1"].overrides
    assert "proxy.patience=null" in by_id["elpv/training_length/finetune_rotation_200_steps_seed2"].overrides
    assert {job.dataset for job in default.jobs if "category=[poly]" in job.overrides} == {"elpv"}


class FakeRunner:
    """Writes what the real CLIs would (a complete results.json, or the checkpoints); fails on request."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, command: list[str], log_path: Path) -> int:
        folder = Path(next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        job = f"{folder.parent.name}/{folder.name}"
        self.calls.append(job)
        folder.mkdir(parents=True, exist_ok=True)
        log_path.write_text("fake run\nlast line of the log\n")
        if job in self.fail:
            return 1
        if command[1] == "experiments/finetune.py":
            root = Path(next(a for a in command if a.startswith("checkpoint_dir=")).split("=", 1)[1])
            for category in CATEGORIES:
                path = root / "rotation" / "effnet_lite0" / f"{category}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x")
                path.with_suffix(".json").write_text("{}")
        else:
            (folder / "results.json").write_text(json.dumps({"complete": True}))
        return 0


def test_resume_skips_finished_jobs(tmp_path) -> None:
    plan = _plan(tmp_path)
    lines: list[str] = []
    runner = FakeRunner(fail={"finetuning/finetune_rotation_seed1", "baselines/full_bank"})
    manifest = run_plan(plan, runner=runner, echo=lines.append)
    status = {row["id"].removeprefix("textures/"): row["status"] for row in manifest["jobs"]}
    assert status["finetuning/finetune_rotation_seed1"] == "failed"
    assert status["finetuning/rotation_seed1"] == "blocked"  # never started without its checkpoints
    assert "finetuning/rotation_seed1" not in runner.calls
    assert status["baselines/full_bank"] == "failed"
    assert sum(s == "done" for s in status.values()) == len(plan.jobs) - 3
    failed = next(row for row in manifest["jobs"] if row["id"] == "textures/baselines/full_bank")
    assert "exit status 1" in failed["error"] and "last line of the log" in failed["error"]
    assert lines[0].startswith("skipped: textures/extractors/wrn50: weights not available")
    assert any(line.startswith("[3/15] textures/extractors/clip_seed0: done in") and "left for" in line
               for line in lines)
    on_disk = json.loads((tmp_path / "t" / MANIFEST).read_text())
    assert on_disk["skipped"] == plan.skipped and on_disk["finished"] is not None

    again = FakeRunner()
    manifest = run_plan(_plan(tmp_path), runner=again, echo=lambda line: None)
    # only what had not finished runs again; everything else is "done before"
    assert again.calls == ["finetuning/finetune_rotation_seed1", "finetuning/rotation_seed1", "baselines/full_bank"]
    assert {row["status"] for row in manifest["jobs"]} == {"done", "done before"}


def test_estimate_left_uses_the_mean_of_each_kind() -> None:
    class J:
        def __init__(self, kind: str) -> None:
            self.kind = kind

    assert estimate_left({}, [J("patchcore")]) is None
    durations = {"patchcore": [10.0, 30.0], "finetune": [100.0]}
    assert estimate_left(durations, [J("patchcore"), J("finetune"), J("patchcore")]) == 140.0
    assert estimate_left({"patchcore": [10.0]}, [J("finetune")]) == 10.0


def test_study_runs_are_grouped_and_saved_models_logged_as_artifacts(tmp_path, monkeypatch) -> None:
    """The W&B side of a study run: group = the study, job type = the comparison, and each saved model
    (save_model=true) logged as the artifact the report's main table names (offline run file)."""
    pytest.importorskip("wandb")
    from experiments.harness.run_key import config_hash
    from experiments.harness.tracking import WandbLogger, model_artifact_name

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    (run_dir / "models" / "brick").mkdir(parents=True)
    (run_dir / "models" / "brick" / "model.json").write_text("{}")
    config = {"backbone": {"name": "effnet_lite0"}, "dataset": {"name": "textures"}, "seed": 0}
    logger = WandbLogger(mode="offline", group="mystudy", job_type="baselines", tags=["study:mystudy"])
    logger.start(config, run_dir, group=None, name="baselines/random_bank")
    logger.finish({"categories": {"brick": {"image_auroc": 0.9}}, "mean": {"image_auroc": 0.9}, "complete": True})
    assert not logger.disabled
    path = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    for _ in range(50):  # the W&B service writes the run file after finish() returns
        record = path.read_bytes()
        if len(record) > 1000 and b"mystudy" in record:
            break
        time.sleep(0.2)
    assert model_artifact_name(config_hash(config), "brick").encode() in record
    assert b"mystudy" in record and b"baselines" in record


def test_a_new_kind_of_comparison_is_one_function_in_kinds(tmp_path, monkeypatch) -> None:
    """docs/architecture.md, "Add a comparison": register the kind, write its YAML, nothing else."""
    from experiments.studies import comparison

    def ratios_and_seeds(name, spec, context):  # each ratio with one seed of its own
        return [comparison.Arm(f"r{r}", (f"coreset.ratio={r}",), (i,)) for i, r in enumerate(spec["ratios"])], []

    monkeypatch.setitem(comparison.KINDS, "ratios", ratios_and_seeds)
    config = _config()
    config["comparisons"] = {"odd": {"title": "Odd ratios", "ratios": [0.3, 0.7]}}
    plan = build_plan(config, tmp_path, ON, check=lambda *_: None)
    assert [job.id for job in plan.jobs] == ["textures/baseline/baseline_seed0", "textures/baseline/baseline_seed1",
                                             "textures/odd/r0.3", "textures/odd/r0.7"]
    assert "coreset.ratio=0.7" in plan.jobs[3].overrides and "seed=1" in plan.jobs[3].overrides
    assert plan.comparisons["textures/odd"] == {"dataset": "textures", "comparison": "odd", "title": "Odd ratios",
                                                "kind": "ratios", "sweep": None, "arms": ["baseline", "r0.3", "r0.7"],
                                                "jobs": [j.id for j in plan.jobs],
                                                "job_arms": {j.id: j.arm for j in plan.jobs}}


def test_old_setting_names_in_a_study_fail_when_it_is_planned(tmp_path) -> None:
    config = _config()
    config["comparisons"] = {"k": {"sweep": "patchcore.num_neighbors", "values": [3]}}
    with pytest.raises(StudyConfigError, match="patchcore.num_neighbors was renamed patchcore.scoring.num_neighbors"):
        build_plan(config, tmp_path, ON, check=lambda *_: None)


# --------------------------------------------------------------------------- several datasets

TWO = {"textures": ["brick", "grass"], "elpv": ["poly", "grass"]}  # "grass" on both: checkpoints must not collide


def _two(**extra) -> dict:
    config = {"name": "two", "backbone": "effnet_lite0", "seeds": [0], "logger": "none",
              "common": ["viz.n=1", "storage.cache_dir=${dataset_dir}/feature_cache"],
              "finetune_overrides": ["method.train.max_steps=3"],
              "datasets": {"textures": {"category": "[brick,grass]"},
                           "elpv": {"category": "[poly,grass]", "overrides": ["dataset.train_limit=4"],
                                    "finetune_overrides": ["dataset.train_limit=8"],
                                    "comparisons": ["finetuning", "training_length"]}},
              "comparisons": {"variants": {"arms": {"cosine": ["patchcore.scoring.distance=cosine"]}},
                              "finetuning": {"methods": ["rotation"]},
                              "training_length": {"methods": ["rotation", "cutmix_contrastive"], "steps": [40, 200]}}}
    config.update(extra)
    return config


def test_a_study_on_two_datasets_plans_each_with_its_baseline(tmp_path) -> None:
    plan = build_plan(_two(), tmp_path, TWO, check=lambda *_: None)
    root = tmp_path / "two"
    ids = [job.id for job in plan.jobs]
    assert ids == ["textures/baseline/baseline", "textures/variants/cosine",
                   "textures/finetuning/finetune_rotation", "textures/finetuning/rotation",
                   *(f"textures/training_length/{job}" for job in (
                       "finetune_rotation_40_steps", "finetune_rotation_200_steps",
                       "finetune_cutmix_contrastive_40_steps", "finetune_cutmix_contrastive_200_steps",
                       "rotation_40_steps", "rotation_200_steps", "cutmix_contrastive_40_steps",
                       "cutmix_contrastive_200_steps")),
                   # elpv: its own baseline, only the comparisons it names (no variants)
                   "elpv/baseline/baseline", "elpv/finetuning/finetune_rotation", "elpv/finetuning/rotation",
                   *(f"elpv/training_length/{job}" for job in (
                       "finetune_rotation_40_steps", "finetune_rotation_200_steps",
                       "finetune_cutmix_contrastive_40_steps", "finetune_cutmix_contrastive_200_steps",
                       "rotation_40_steps", "rotation_200_steps", "cutmix_contrastive_40_steps",
                       "cutmix_contrastive_200_steps"))]
    jobs = {job.id: job for job in plan.jobs}
    assert all(job.folder == root / job.id for job in plan.jobs)
    # each dataset's comparisons start from its own baseline
    assert [key for key in plan.comparisons] == ["textures/variants", "textures/finetuning", "textures/training_length",
                                                 "elpv/finetuning", "elpv/training_length"]
    for key, entry in plan.comparisons.items():
        dataset = key.split("/")[0]
        assert entry["dataset"] == dataset and entry["jobs"][0] == f"{dataset}/baseline/baseline"
        assert all(job.startswith(f"{dataset}/") for job in entry["jobs"])
    elpv_base = jobs["elpv/baseline/baseline"].overrides
    assert {"dataset=elpv", "category=[poly,grass]", "dataset.train_limit=4",
            f"storage.cache_dir={root / 'elpv'}/feature_cache"} <= set(elpv_base)
    assert f"storage.cache_dir={root / 'textures'}/feature_cache" in jobs["textures/baseline/baseline"].overrides
    assert not any(o.startswith("dataset.train_limit") for o in jobs["textures/baseline/baseline"].overrides)
    # checkpoints per dataset: the category grass of both never shares a file
    textures_ft, elpv_ft = jobs["textures/finetuning/finetune_rotation"], jobs["elpv/finetuning/finetune_rotation"]
    assert textures_ft.checkpoints == [root / "textures" / "checkpoints" / "seed0" / "rotation" / "effnet_lite0" /
                                       f"{c}.pt" for c in ("brick", "grass")]
    assert elpv_ft.checkpoints == [root / "elpv" / "checkpoints" / "seed0" / "rotation" / "effnet_lite0" / f"{c}.pt"
                                   for c in ("poly", "grass")]
    assert {"dataset=elpv", "dataset.train_limit=8", "method.train.max_steps=3"} <= set(elpv_ft.overrides)
    assert f"backbone.checkpoint={root}/elpv/checkpoints/seed0/rotation/effnet_lite0/${{category}}.pt" in \
        jobs["elpv/finetuning/rotation"].overrides
    every = [path for job in plan.jobs for path in job.checkpoints]
    assert len(every) == len(set(every)) == 2 * 5 * 2  # 5 fine-tunings per dataset, 2 categories each


def test_training_length_arms_sweep_the_fine_tuning_steps(tmp_path) -> None:
    plan = build_plan(_two(), tmp_path, TWO, check=lambda *_: None)
    curve = plan.comparisons["elpv/training_length"]
    assert curve["kind"] == "methods" and curve["sweep"] == "method.train.max_steps"
    assert curve["arms"] == ["baseline", "rotation 40 steps", "rotation 200 steps", "cutmix_contrastive 40 steps",
                             "cutmix_contrastive 200 steps"]
    assert curve["points"] == {"baseline": {"series": "baseline", "value": 0},
                               "rotation 40 steps": {"series": "rotation", "value": 40},
                               "rotation 200 steps": {"series": "rotation", "value": 200},
                               "cutmix_contrastive 40 steps": {"series": "cutmix_contrastive", "value": 40},
                               "cutmix_contrastive 200 steps": {"series": "cutmix_contrastive", "value": 200}}
    jobs = {job.id: job for job in plan.jobs}
    tuned = jobs["elpv/training_length/finetune_cutmix_contrastive_200_steps"]
    # the arm's step count replaces the study's fine-tuning steps (one value per key: Hydra refuses repeats)
    assert [o for o in tuned.overrides if o.startswith("method.train.max_steps")] == ["method.train.max_steps=200"]
    assert "method=cutmix_contrastive" in tuned.overrides
    root = tmp_path / "two" / "elpv" / "checkpoints" / "cutmix_contrastive_200_steps" / "seed0"
    assert f"checkpoint_dir={root}" in tuned.overrides
    assert jobs["elpv/training_length/cutmix_contrastive_200_steps"].needs == [tuned.id]
    bad = _two()
    bad["comparisons"]["training_length"]["steps"] = [40, 0]
    with pytest.raises(StudyConfigError, match="comparisons.training_length.steps: .*step 0.*is the baseline"):
        build_plan(bad, tmp_path, TWO, check=lambda *_: None)


def test_the_same_fine_tuning_in_two_comparisons_runs_once(tmp_path) -> None:
    config = _two(seeds=[0])
    config["comparisons"]["again"] = {"methods": ["rotation"]}
    config["datasets"] = {"textures": {"category": "brick"}}
    plan = build_plan(config, tmp_path, {"textures": ["brick"]}, check=lambda *_: None)
    finetunes = [job.id for job in plan.jobs if job.kind == "finetune"]
    assert "textures/again/finetune_rotation" not in finetunes
    assert plan.comparisons["textures/again"]["jobs"] == plan.comparisons["textures/finetuning"]["jobs"]


def test_dataset_settings_are_checked_when_planned(tmp_path) -> None:
    old = {"name": "old", "dataset": "textures", "category": "all", "backbone": "effnet_lite0", "seeds": [0],
           "comparisons": {}}
    with pytest.raises(StudyConfigError, match=r"dataset, category are of the old single-dataset form.*'datasets:'"):
        build_plan(old, tmp_path, {"textures": ["brick"]})
    config = _two()
    config["datasets"]["elpv"]["comparisons"] = ["finetuning", "nonesuch"]
    with pytest.raises(StudyConfigError, match=r"datasets.elpv.comparisons: .*nonesuch.*variants, finetuning"):
        build_plan(config, tmp_path, TWO, check=lambda *_: None)
    config = _two()
    config["datasets"]["elpv"]["categories"] = ["poly"]
    with pytest.raises(StudyConfigError, match=r"datasets.elpv: \['categories'\] not understood"):
        build_plan(config, tmp_path, TWO, check=lambda *_: None)
    config = _two()
    config["datasets"]["elpv"]["overrides"] = ["patchcore.num_neighbors=3"]
    with pytest.raises(StudyConfigError, match="renamed patchcore.scoring.num_neighbors"):
        build_plan(config, tmp_path, TWO, check=lambda *_: None)


def test_the_manifest_records_each_comparisons_dataset(tmp_path) -> None:
    class Writes(FakeRunner):
        def __call__(self, command: list[str], log_path: Path) -> int:
            if command[1] == "experiments/finetune.py":  # this study's categories, not the module's
                root = Path(next(a for a in command if a.startswith("checkpoint_dir=")).split("=", 1)[1])
                method = next(a for a in command if a.startswith("method=")).split("=", 1)[1]
                dataset = next(a for a in command if a.startswith("dataset=")).split("=", 1)[1]
                for category in TWO[dataset]:
                    path = root / method / "effnet_lite0" / f"{category}.pt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"x")
                    path.with_suffix(".json").write_text("{}")
                log_path.parent.mkdir(parents=True, exist_ok=True)
                return 0
            return super().__call__(command, log_path)

    plan = build_plan(_two(), tmp_path, TWO, check=lambda *_: None)
    manifest = run_plan(plan, runner=Writes(), echo=lambda line: None)
    on_disk = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert on_disk["datasets"]["elpv"] == {"category": "[poly,grass]", "categories": ["poly", "grass"],
                                           "overrides": ["dataset.train_limit=4"],
                                           "finetune_overrides": ["dataset.train_limit=8"],
                                           "comparisons": ["finetuning", "training_length"]}
    assert on_disk["comparisons"]["elpv/finetuning"]["dataset"] == "elpv"
    assert {row["dataset"] for row in manifest["jobs"]} == {"textures", "elpv"}
    assert all(row["id"].startswith(row["dataset"] + "/") and row["status"] == "done" for row in manifest["jobs"])


# --------------------------------------------------------------------------- the report of a study on two datasets

AUROCS = {("textures", "baseline"): {"brick": 0.90, "grass": 0.80},
          ("textures", "cosine"): {"brick": 0.95, "grass": 0.85},
          ("textures", "rotation"): {"brick": 0.92, "grass": 0.82},
          ("textures", "rotation 40 steps"): {"brick": 0.91, "grass": 0.81},
          ("textures", "rotation 200 steps"): {"brick": 0.93, "grass": 0.83},
          ("textures", "cutmix_contrastive 40 steps"): {"brick": 0.90, "grass": 0.80},
          ("textures", "cutmix_contrastive 200 steps"): {"brick": 0.89, "grass": 0.79},
          ("elpv", "baseline"): {"poly": 0.70}, ("elpv", "rotation"): {"poly": 0.72},
          ("elpv", "rotation 40 steps"): {"poly": 0.71}, ("elpv", "rotation 200 steps"): {"poly": 0.74},
          ("elpv", "cutmix_contrastive 40 steps"): {"poly": 0.69},
          ("elpv", "cutmix_contrastive 200 steps"): {"poly": 0.68}}
NO_MASKS = "ELPV has image labels only (no defect masks)"


class RecordWriter:
    """Writes what the real CLIs would: results.json + scores.csv with chosen image AUROCs (elpv: pixel metrics
    null with their note, as core/data/elpv.py runs record them), checkpoints for fine-tuning jobs."""

    def __init__(self, plan) -> None:
        self.jobs = {str(job.folder): job for job in plan.jobs}
        self.categories = plan.categories

    def __call__(self, command: list[str], log_path: Path) -> int:
        from tests.test_report import write_run

        folder = next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1]
        job = self.jobs[folder]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if job.kind == "finetune":
            for path in job.checkpoints:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x")
                path.with_suffix(".json").write_text("{}")
            return 0
        overrides = tuple(o for o in command[2:] if not o.startswith("hydra."))
        arm = job.arm
        write_run(Path(folder), _compose, overrides, AUROCS[(job.dataset, arm)], images=10)
        if job.dataset == "elpv":
            record = json.loads((Path(folder) / "results.json").read_text())
            for entry in [*record["categories"].values(), record["mean"]]:
                entry.update(pixel_auroc=None, pixel_f1_max=None, aupro=None)
            for entry in record["categories"].values():
                entry["pixel_metrics_note"] = NO_MASKS
            (Path(folder) / "results.json").write_text(json.dumps(record))
        return 0


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def two_dataset_report(tmp_path_factory):
    from experiments.report import main

    root = tmp_path_factory.mktemp("studies")
    config = _two()
    config["datasets"]["elpv"]["category"] = "poly"
    plan = build_plan(config, root, {"textures": ["brick", "grass"], "elpv": ["poly"]}, check=lambda *_: None)
    run_plan(plan, runner=RecordWriter(plan), echo=lambda line: None)
    out = tmp_path_factory.mktemp("report")
    main([str(plan.folder), "--out", str(out), "--no-digest-pdf"])
    return out, json.loads((out / "paper.json").read_text())


def _table(path: Path) -> list[list[str]]:
    import csv

    with path.open() as handle:
        return list(csv.reader(handle))


def test_the_report_groups_comparisons_by_dataset(two_dataset_report) -> None:
    out, paper = two_dataset_report
    assert paper["datasets"] == ["textures", "elpv"] and not paper["excluded"]
    assert list(paper["comparisons"]) == ["textures_variants", "textures_finetuning", "textures_training_length",
                                          "elpv_finetuning", "elpv_training_length"]
    assert paper["comparisons"]["elpv_finetuning"]["title"] == "finetuning (elpv)"
    # each table's categories are its dataset's; each mean is over that dataset's categories only
    textures = _table(out / "tables" / "paper_textures_variants_image_auroc.csv")
    assert textures[0] == ["arm", "brick", "grass", "mean"]
    assert [float(x) for x in textures[1][1:]] == pytest.approx([90.0, 80.0, 85.0])
    assert [float(x) for x in textures[2][1:]] == pytest.approx([95.0, 85.0, 90.0])
    elpv = _table(out / "tables" / "paper_elpv_finetuning_image_auroc.csv")
    assert elpv[0] == ["arm", "poly", "mean"]
    assert [float(x) for x in elpv[1][1:]] == pytest.approx([70.0, 70.0])
    assert [float(x) for x in elpv[2][1:]] == pytest.approx([72.0, 72.0])
    # the main table has one baseline per dataset, each the mean over its own categories
    main = {row[0]: row for row in _table(out / "tables" / "paper_main.csv")}
    assert float(main["baseline (textures)"][1]) == pytest.approx(85.0)
    assert float(main["baseline (elpv)"][1]) == pytest.approx(70.0)
    assert float(main["finetuning (elpv): rotation"][1]) == pytest.approx(72.0)
    # headings and captions say the dataset
    source = (out / "report.typ").read_text()
    assert "== Results on ELPV" in source and "== Results on textures" in source
    assert "finetuning (elpv): Image AUROC per category" in (out / "tables" / "paper_elpv_finetuning_image_auroc.md") \
        .read_text()


def test_missing_pixel_metrics_show_as_a_dash_with_the_note(two_dataset_report) -> None:
    out, _ = two_dataset_report
    summary = (out / "tables" / "paper_elpv_finetuning_summary.md").read_text().splitlines()
    header = [c.strip() for c in summary[2].strip("|").split("|")]
    baseline = [c.strip().strip("*") for c in summary[4].strip("|").split("|")]
    cells = dict(zip(header, baseline))
    assert cells["arm"] == "baseline" and cells["Pixel AUROC"] == "-" and cells["AUPRO"] == "-"
    assert cells["Image AUROC"] == "70.0"
    textures = (out / "tables" / "paper_textures_variants_summary.md").read_text()
    assert "| baseline | 1 | 85.0 | 84.0 | 75.0 |" in textures  # textures keeps its pixel metrics
    note = f"elpv: Pixel AUROC and AUPRO are shown as '-' (no pixel metrics: {NO_MASKS})."
    assert note.replace("'", "&#x27;") in (out / "report.html").read_text()
    assert note in (out / "digest.md").read_text()
    assert "textures: Pixel AUROC" not in (out / "digest.md").read_text()


def test_the_training_length_curve_is_drawn_and_ordered_by_steps(two_dataset_report) -> None:
    from PIL import Image

    out, paper = two_dataset_report
    for dataset in ("textures", "elpv"):
        name = f"figures/sweep_{dataset}_training_length.png"
        assert name in paper["figures"]
        with Image.open(out / name) as image:
            image.verify()
    rows = _table(out / "tables" / "paper_elpv_training_length_image_auroc.csv")
    assert [row[0] for row in rows[1:]] == ["baseline", "rotation 40 steps", "rotation 200 steps",
                                            "cutmix_contrastive 40 steps", "cutmix_contrastive 200 steps"]
    assert [float(row[1]) for row in rows[1:]] == pytest.approx([70.0, 71.0, 74.0, 69.0, 68.0])


def test_a_comparison_may_run_on_fewer_seeds(tmp_path) -> None:
    config = _two(seeds=[0, 1, 2])
    config["comparisons"]["training_length"]["seeds"] = [0]
    plan = build_plan(config, tmp_path, TWO, check=lambda *_: None)
    curve = [job for job in plan.jobs if job.dataset == "elpv" and job.comparison == "training_length"]
    assert {job.seed for job in curve} == {0} and len(curve) == 8  # 4 fine-tunings, 4 PatchCore runs
    assert [job.id for job in curve if job.kind == "finetune"][0] == \
        "elpv/training_length/finetune_rotation_40_steps_seed0"
    assert {job.seed for job in plan.jobs if job.comparison == "baseline"} == {0, 1, 2}
    assert {job.seed for job in plan.jobs if job.comparison == "finetuning"} == {0, 1, 2}
    config["comparisons"]["training_length"]["seeds"] = "0"
    with pytest.raises(StudyConfigError, match="comparisons.training_length.seeds: '0': give a list of seeds"):
        build_plan(config, tmp_path, TWO, check=lambda *_: None)


def test_the_command_line_picks_one_dataset_of_a_study(capsys) -> None:
    from experiments.study import main

    with pytest.raises(SystemExit, match=r"--category brick: the study runs on textures, elpv; name the dataset too"):
        main(["--study", "quick", "--category", "brick", "--dry-run"])
    main(["--study", "quick", "--dataset", "elpv", "--out", "/nonexistent/studies", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("study quick_elpv on elpv (poly): 3 jobs in 1 comparisons")
    # the study's own entry for elpv: its categories, overrides and comparison subset
    assert all("/nonexistent/studies/quick_elpv/elpv/" in line and "category=poly" in line for line in lines[1:])
    assert sum("dataset.image_size=112" in line for line in lines[1:]) == 3  # fine-tuning included
