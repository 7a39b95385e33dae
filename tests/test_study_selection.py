"""The study's ``selection`` comparison (experiments/studies/selection_kind.py, reporting/selection_tables.py): its
jobs (one select job per seed, one PatchCore run per candidate, the base candidate being the baseline run), the
select job's overrides composed with the real conf/, when a select job is done, and the report's numbers on a
study folder written by hand: the choice per (seed, category), the oracle (test set), the paired differences and
the Spearman rank correlation against hand computations."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from experiments.harness.selection_file import FORMAT, VERSION
from experiments.studies.plan import StudyConfigError, build_plan, load_study
from experiments.studies.runner import is_done, run_plan

ON = {"textures": ["brick", "grass"]}
IMAGE = "image_size:dataset.image_size=160 dataset.resize=183"  # the candidates of conf/select/space/quick.yaml
K3 = "num_neighbors:patchcore.scoring.num_neighbors=3"
RATIO = "coreset_ratio:coreset.ratio=0.01"
CANDIDATES = ["base", IMAGE, K3, RATIO]
# test image AUROC per (seed, category), in CANDIDATES' order, and the proxy scores selection.json gives them
# (None: a candidate whose proxy score was not finite)
AUROCS = {(0, "brick"): [0.80, 0.60, 0.90, 0.70], (1, "brick"): [0.82, 0.62, 0.88, 0.70],
          (0, "grass"): [0.70, 0.75, 0.65, 0.72], (1, "grass"): [0.71, 0.77, 0.60, 0.70]}
SCORES = {(0, "brick"): [0.9, 0.5, 0.7, None], (1, "brick"): [0.6, 0.1, 0.8, 0.3],
          (0, "grass"): [0.5, 0.9, 0.4, 0.7], (1, "grass"): [0.5, 0.4, 0.9, 0.7]}


def _config(**extra) -> dict:
    config = {"name": "sel", "backbone": "effnet_lite0", "seeds": [0, 1], "logger": "none",
              "common": ["viz.n=1", "storage.cache_dir=${dataset_dir}/feature_cache"],
              "datasets": {"textures": {"category": "[brick,grass]"}},
              "comparisons": {"coreset_ratio": {"sweep": "coreset.ratio", "values": [0.01]},
                              "selection": {"title": "Selection", "selection": {"space": "quick"}}}}
    config.update(extra)
    return config


def _plan(tmp_path: Path, config: dict | None = None):
    return build_plan(config or _config(), tmp_path, ON, check=lambda *_: None)


def test_a_selection_comparison_plans_a_select_job_per_seed_and_a_run_per_candidate(tmp_path) -> None:
    plan = _plan(tmp_path)
    jobs = {job.id: job for job in plan.jobs}
    entry = plan.comparisons["textures/selection"]
    baseline = ["textures/baseline/baseline_seed0", "textures/baseline/baseline_seed1"]
    shared = ["textures/coreset_ratio/ratio_0.01_seed0", "textures/coreset_ratio/ratio_0.01_seed1"]
    assert entry["jobs"] == [*baseline, "textures/selection/select_seed0", "textures/selection/select_seed1",
                             *(f"textures/selection/{arm}_seed{s}" for arm in (
                                 "image_size_dataset.image_size_160_dataset.resize_183",
                                 "num_neighbors_patchcore.scoring.num_neighbors_3") for s in (0, 1)), *shared]
    # the base candidate is the baseline run (no run of its own); a candidate equal to another comparison's arm is
    # that run, named by its arm in each comparison
    assert entry["selection"]["candidates"] == {"base": "baseline", IMAGE: IMAGE, K3: K3, RATIO: RATIO}
    assert entry["arms"] == ["baseline", IMAGE, K3, RATIO]
    assert not any(job.arm == "base" for job in plan.jobs)
    assert [entry["job_arms"][j] for j in [*baseline, *shared]] == ["baseline"] * 2 + [RATIO] * 2
    assert plan.comparisons["textures/coreset_ratio"]["job_arms"][shared[0]] == "ratio=0.01"
    select = jobs["textures/selection/select_seed1"]
    assert select.kind == "select" and select.command("python")[1] == "experiments/selection.py"
    assert select.overrides == ["dataset=textures", "category=[brick,grass]", "backbone=effnet_lite0", "progress=false",
                                "viz.n=1", f"storage.cache_dir={tmp_path / 'sel' / 'textures'}/feature_cache",
                                "select/space=quick", "seed=1", "select.seed=1"]
    # the candidates' runs do not wait for the selection; each is the baseline's overrides plus its own
    candidate = jobs["textures/selection/num_neighbors_patchcore.scoring.num_neighbors_3_seed1"]
    assert candidate.needs == [] and candidate.kind == "patchcore"
    assert set(candidate.overrides) - set(jobs[baseline[1]].overrides) == {"patchcore.scoring.num_neighbors=3"}
    # a second selection comparison of the same space shares the select jobs
    config = _config()
    config["comparisons"]["again"] = {"selection": {"space": "quick"}}
    again = _plan(tmp_path, config).comparisons["textures/again"]["jobs"]
    assert "textures/selection/select_seed0" in again and not any("again/" in j for j in again)


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def test_the_select_jobs_of_the_selection_study_compose_with_the_real_conf(tmp_path) -> None:
    """conf/study/selection.yaml: ELPV fixes coreset.ratio=0.05, which the default space varies: that axis is
    dropped from the select job's space (selection.py refuses a base setting a varied key), and the planner's
    candidates are the ones the select job's composed space makes."""
    from omegaconf import OmegaConf

    from experiments.harness.selection_space import candidates, check_base, main_overrides

    plan = build_plan(load_study("selection"), tmp_path, {"textures": ["brick", "grass", "gravel", "tissue"],
                                                          "elpv": ["mono", "poly"]}, check=lambda *_: None)
    assert set(plan.comparisons) == {"textures/selection", "elpv/selection"}
    for dataset, dropped in (("textures", []), ("elpv", ["~select.space.axes.coreset_ratio"])):
        entry = plan.comparisons[f"{dataset}/selection"]
        assert entry["selection"]["dropped"] == dropped
        selects = [job for job in plan.jobs if job.kind == "select" and job.dataset == dataset]
        assert [job.seed for job in selects] == [0]
        overrides = selects[0].overrides
        cfg = _compose("select", overrides)
        assert (cfg.seed, cfg.select.seed, cfg.dataset.name, cfg.backbone.name) == (0, 0, dataset, "effnet_lite0")
        space = OmegaConf.to_container(cfg.select.space, resolve=False)
        options = [tuple(o) for o in space.get("backbones") or []]
        # the study keeps the plain backbones its check accepts (here: all) and leaves fine-tuned options out
        assert options == [("backbone=effnet_lite0",), ("backbone=resnet18",), ("backbone=wrn50",)]
        layer_keys = {(): "effnet_lite0", **{o: o[0].split("=")[1] for o in options}}
        found = candidates(space, layer_keys)
        # the option equal to the run's own backbone is the base again (selection.py scores it once)
        assert [c.name for c in found if c.overrides != ["backbone=effnet_lite0"]] == \
            list(entry["selection"]["candidates"])
        check_base(main_overrides(overrides), found)  # what selection.py checks before any fit: no clash
        # the base candidate is the baseline run's config: the same overrides but bookkeeping (and the category,
        # which the select job takes as its own key)
        base = main_overrides(overrides)
        baseline = next(job for job in plan.jobs if job.id == f"{dataset}/baseline/baseline").overrides
        category = "all" if dataset == "textures" else "[mono,poly]"
        assert set(base) < set(baseline)
        assert set(baseline) - set(base) == {f"category={category}", "force=true", "logger=none"}
    elpv = _compose("select", next(j for j in plan.jobs if j.id == "elpv/selection/select").overrides)
    assert elpv.coreset.ratio == 0.05 and elpv.dataset.train_limit == 200 and "coreset_ratio" not in \
        elpv.select.space.axes
    # 9 less the two ratios, plus resnet18 and wrn50 (weights accepted by this test's check)
    assert len(plan.comparisons["elpv/selection"]["selection"]["candidates"]) == 9


@pytest.mark.parametrize("spec, message", [
    ({"space": "nonesuch"}, r"comparisons.selection.selection.space: 'nonesuch': no file .*nonesuch.yaml "
                            r"\(known spaces: .*default"),
    ({"space": "quick", "overrides": ["coreset.ratio=0.5"]}, r"selection.overrides: .*give a list of select\.\*"),
    ({"space": "quick", "budget": 3}, r"comparisons.selection.selection: .*give \{space:")])
def test_a_bad_selection_comparison_is_named_when_planned(tmp_path, spec, message) -> None:
    config = _config()
    config["comparisons"]["selection"]["selection"] = spec
    with pytest.raises(StudyConfigError, match=message):
        _plan(tmp_path, config)


def _selection_json(folder: Path, seed: int, complete: bool = True) -> None:
    """selection.json as experiments/harness/selection.py writes it, with SCORES' proxy scores."""
    overrides = dict(zip(CANDIDATES, ([], ["dataset.image_size=160", "dataset.resize=183"],
                                      ["patchcore.scoring.num_neighbors=3"], ["coreset.ratio=0.01"])))
    categories, chosen = {}, {}
    for category in ON["textures"]:
        entries = [{"name": name, "overrides": overrides[name], "key": f"k{i}", "config_hash": f"h{i}",
                    "score": score, "image_auroc": score, "pixel_auroc": score, "n_fit": 8, "n_held_out": 2}
                   for i, (name, score) in enumerate(zip(CANDIDATES, SCORES[seed, category]))]
        best = max((e for e in entries if e["score"] is not None), key=lambda e: e["score"])
        categories[category] = {"candidates": entries, "chosen": best["name"]}
        chosen[category] = ["dataset=textures", *best["overrides"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "selection.json").write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "complete": complete, "dataset": "textures", "space": "quick",
        "base_overrides": ["dataset=textures"], "metric": "mean_auroc", "seed": seed, "categories": categories,
        "chosen": chosen, "commands": {}, "time_s": 1.0}))


class FakeJobs:
    """Writes what the CLIs would: results.json + scores.csv with AUROCS (tests/test_report.py write_run), and
    selection.json for the select jobs."""

    def __init__(self, plan) -> None:
        self.jobs = {str(job.folder): job for job in plan.jobs}
        entries = [entry for entry in plan.comparisons.values() if "selection" in entry]
        self.arms = {job: arm for entry in entries for job, arm in entry["job_arms"].items()}
        self.candidates = {arm: name for name, arm in entries[0]["selection"]["candidates"].items()}

    def __call__(self, command: list[str], log_path: Path) -> int:
        from tests.test_report import write_run

        folder = next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1]
        job = self.jobs[folder]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if job.kind == "select":
            _selection_json(Path(folder), job.seed)
            return 0
        # a run the selection does not share (another seed's): the baseline, or the coreset sweep's 1 %
        name = self.candidates[self.arms[job.id]] if job.id in self.arms else \
            "base" if job.comparison == "baseline" else RATIO
        index = CANDIDATES.index(name)
        aurocs = {category: AUROCS[job.seed, category][index] for category in ON["textures"]}
        write_run(Path(folder), lambda *o: _compose("config", list(o)),
                  tuple(o for o in command[2:] if not o.startswith("hydra.")), aurocs, images=10)
        return 0


def test_a_select_job_is_done_when_its_selection_json_is_complete(tmp_path) -> None:
    plan = _plan(tmp_path)
    select = next(job for job in plan.jobs if job.kind == "select")
    assert not is_done(select)
    _selection_json(select.folder, select.seed, complete=False)
    assert not is_done(select)
    (select.folder / "results.json").write_text(json.dumps({"complete": True}))  # not a select job's record
    assert not is_done(select)
    _selection_json(select.folder, select.seed)
    assert is_done(select)
    ran = []
    manifest = run_plan(plan, runner=lambda command, log: ran.append(command) or 1, echo=lambda line: None)
    rows = {row["id"]: row for row in manifest["jobs"]}
    assert rows[select.id]["status"] == "done before" and rows[select.id]["kind"] == "select"
    assert not any(command[1] == "experiments/selection.py" and f"seed={select.seed}" in command for command in ran)
    assert rows["textures/selection/select_seed1"]["status"] == "failed"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    plan = build_plan(_config(), root, ON, check=lambda *_: None)
    run_plan(plan, runner=FakeJobs(plan), echo=lambda line: None)
    return plan


def test_the_choice_the_oracle_and_the_rank_correlation(study) -> None:
    from experiments.reporting.comparisons import load
    from experiments.reporting.selection_tables import selection_numbers

    inputs = load([study.folder])
    comparison = next(c for c in inputs.comparisons if c.name == "textures_selection")
    assert [arm.name for arm in comparison.arms] == ["baseline", IMAGE, K3, RATIO]
    sweep = next(c for c in inputs.comparisons if c.name == "textures_coreset_ratio")
    assert [arm.name for arm in sweep.arms] == ["baseline", "ratio=0.01"]  # the shared run, its own name there
    found = selection_numbers(comparison)
    assert found.notes == [] and len(found.files) == 2
    # each (seed, category) takes the run of the candidate its own seed's selection.json chose (highest score)
    assert found.chosen == {(0, "brick"): "baseline", (1, "brick"): K3, (0, "grass"): IMAGE, (1, "grass"): K3}
    rows = found.choice.set_index(["seed", "category"])
    folders = {arm.name: {Path(d).name for d in arm.rows["run_dir"]} for arm in comparison.arms}
    for (seed, category), arm in found.chosen.items():
        assert Path(rows.loc[(seed, category), "run_dir"]).name in folders[arm]
        assert rows.loc[(seed, category), "image_auroc"] == pytest.approx(
            AUROCS[seed, category][CANDIDATES.index("base" if arm == "baseline" else arm)])
    # the oracle: per category, the best mean test AUROC over seeds (brick: k=3 0.89; grass: 160 px 0.76)
    assert found.oracle == {"brick": K3, "grass": IMAGE}
    # paired differences to the defaults, mean over seeds in points: the choice brick (0 + 6) / 2, grass
    # (5 - 11) / 2; the oracle brick (10 + 6) / 2, grass (5 + 6) / 2; pooled: the mean over the categories
    assert found.choice_diff["categories"]["brick"]["mean"] == pytest.approx(3.0)
    assert found.choice_diff["categories"]["grass"]["mean"] == pytest.approx(-3.0)
    assert found.choice_diff["mean"] == pytest.approx(0.0, abs=1e-9)
    assert found.oracle_diff["categories"]["brick"]["mean"] == pytest.approx(8.0)
    assert found.oracle_diff["categories"]["grass"]["mean"] == pytest.approx(5.5)
    assert found.oracle_diff["mean"] == pytest.approx(6.75)
    assert found.choice_diff["method"] == found.oracle_diff["method"] == "bootstrap"
    assert found.oracle_diff["low"] <= 6.75 <= found.oracle_diff["high"]
    # Spearman by hand: brick seed 0 (ratio unscored): scores [0.9, 0.5, 0.7] vs AUROCs [0.8, 0.6, 0.9]: ranks
    # [3, 1, 2] vs [2, 1, 3], d^2 = 2, rho = 1 - 6 * 2 / (3 * 8) = 0.5; brick seed 1 and grass seed 0 rank alike
    # (1.0); grass seed 1: ranks [2, 1, 4, 3] vs [3, 4, 1, 2], d^2 = 20, rho = 1 - 6 * 20 / (4 * 15) = -1
    assert found.spearman == {"brick": {0: pytest.approx(0.5), 1: pytest.approx(1.0)},
                              "grass": {0: pytest.approx(1.0), 1: pytest.approx(-1.0)}}
    assert found.counts == {"brick": {0: 3, 1: 4}, "grass": {0: 4, 1: 4}}


def test_a_baseline_with_more_seeds_than_the_selection_does_not_win_the_oracle_by_default(study) -> None:
    """The default study runs its baseline on 3 seeds and the selection on 1: the candidates still compete for the
    oracle (each with its mean over its runs), and the baseline with its mean over all of its seeds."""
    from dataclasses import replace

    from experiments.reporting.comparisons import load
    from experiments.reporting.selection_tables import selection_numbers

    comparison = next(c for c in load([study.folder]).comparisons if c.name == "textures_selection")
    base = comparison.baseline
    extra = base.rows[base.rows["seed"] == 0].assign(seed=5)  # a third seed that scores as seed 0
    found = selection_numbers(replace(comparison, arms=[replace(base, rows=pd.concat([base.rows, extra])),
                                                        *comparison.arms[1:]]))
    assert found.oracle == {"brick": K3, "grass": IMAGE}  # as without the extra seed
    # ... and a baseline whose mean is the best is the oracle: three more seeds at 99 % lift its brick mean from
    # 81 % to (2 x 81 + 3 x 99) / 5 = 91.8 %, above k = 3's 89 %
    seed0 = base.rows[base.rows["seed"] == 0]
    better = pd.concat([seed0.assign(seed=seed, image_auroc=0.99) for seed in (5, 6, 7)])
    found = selection_numbers(replace(comparison, arms=[replace(base, rows=pd.concat([base.rows, better])),
                                                        *comparison.arms[1:]]))
    assert found.oracle["brick"] == "baseline"


def test_a_selection_with_fewer_seeds_than_the_baseline_pairs_seed_with_seed(tmp_path) -> None:
    """The default study runs its baseline on 3 seeds and its selection on 1: the selection comparison's defaults
    are the baseline at the selection's seeds (every table of it pairs same seed with same seed); other
    comparisons keep every baseline seed."""
    from experiments.reporting.comparisons import load
    from experiments.reporting.selection_tables import selection_numbers

    config = _config()
    config["comparisons"]["selection"]["seeds"] = [1]
    plan = _plan(tmp_path, config)
    run_plan(plan, runner=FakeJobs(plan), echo=lambda line: None)
    comparisons = {c.name: c for c in load([plan.folder]).comparisons}
    selection, sweep = comparisons["textures_selection"], comparisons["textures_coreset_ratio"]
    assert selection.baseline.seeds == [1] and sweep.baseline.seeds == [0, 1]
    found = selection_numbers(selection)
    # seed 1 chose k = 3 on both categories: brick 0.88 - 0.82, grass 0.60 - 0.71; pooled (6 - 11) / 2
    assert found.chosen == {(1, "brick"): K3, (1, "grass"): K3}
    assert found.choice_diff["categories"]["brick"]["mean"] == pytest.approx(6.0)
    assert found.choice_diff["mean"] == pytest.approx(-2.5)
    assert "same seed, 1 seed" in found.choice_diff["pairing"]


def test_written_text_quotes_the_selection_as_the_tables_do(study) -> None:
    """The claims' selection quantities are the tables' numbers (the hand-computed ones above)."""
    from experiments.reporting.claims import Quantities, check, printed
    from experiments.reporting.comparisons import load

    q = Quantities(load([study.folder]).comparisons)
    key = "textures/selection"
    assert q.value(f"diff({key} | label-free choice | image_auroc | brick)") == pytest.approx(3.0)
    assert q.value(f"diff({key} | oracle (test set) | image_auroc)") == pytest.approx(6.75)
    assert q.value(f"diff({key} | label-free choice | image_auroc)") == pytest.approx(0.0, abs=1e-9)
    assert q.value(f"mean({key} | oracle (test set) | image_auroc | grass)") == pytest.approx(76.0)
    assert q.value(f"mean({key} | label-free choice | image_auroc)") == pytest.approx(75.75)
    assert q.value(f"gap({key} | label-free choice | oracle (test set) | image_auroc)") == pytest.approx(82.5 - 75.75)
    assert q.value(f"selection_spearman({key} | brick)") == pytest.approx(0.75)
    assert q.value(f"selection_spearman({key})") == pytest.approx(0.375)
    assert printed(q.value(f"selection_spearman({key})"), "selection_spearman(x)") == "+0.38"
    assert q.value(f"chosen({key} | brick)") == f"seed 0: baseline; seed 1: {K3}"
    assert q.value(f"oracle({key} | grass)") == IMAGE
    # the verdict the paired table prints (10 test images: too few to resolve 6.75 points)
    assert q.value(f"verdict({key} | oracle (test set) | image_auroc)") == "not resolved"
    assert check(f"high({key} | oracle (test set) | image_auroc) > 6.75", q, "t").holds
    assert not check(f"selection_spearman({key} | mould) > 0", q, "t").holds  # an unknown category
    assert not check("selection_spearman(textures/coreset_ratio) > 0", q, "t").holds  # not a selection


def test_rank_correlation_needs_three_candidates_and_no_constant() -> None:
    import math

    from experiments.reporting.selection_tables import rank_correlation

    assert rank_correlation([0.9, 0.5, 0.7], [0.8, 0.6, 0.9]) == pytest.approx(0.5)
    assert rank_correlation([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([0.9, 0.5], [0.8, 0.6]))
    assert math.isnan(rank_correlation([0.5, 0.5, 0.5], [0.8, 0.6, 0.9]))


def test_the_report_has_the_selection_tables(study, tmp_path) -> None:
    import csv

    from experiments.report import main

    out = tmp_path / "report"
    main([str(study.folder), "--out", str(out), "--no-digest-pdf"])
    paper = json.loads((out / "paper.json").read_text())
    assert {"textures_selection_choice", "textures_selection_choice_paired", "textures_selection_spearman"} <= \
        set(paper["tables"])

    def table(name: str) -> dict[str, list[str]]:
        with (out / "tables" / f"{name}.csv").open() as handle:
            return {row[0]: row[1:] for row in csv.reader(handle)}

    choice = table("paper_textures_selection_choice")
    assert choice["category"] == ["defaults", "label-free choice", "oracle (test set)", "chosen (seed: candidate)",
                                  "oracle (test set): candidate"]
    assert [float(x) for x in choice["brick"][:3]] == pytest.approx([81.0, 84.0, 89.0])
    assert [float(x) for x in choice["grass"][:3]] == pytest.approx([70.5, 67.5, 76.0])
    assert [float(x) for x in choice["mean"][:3]] == pytest.approx([75.75, 75.75, 82.5])
    spearman = table("paper_textures_selection_spearman")
    assert float(spearman["brick"][0]) == pytest.approx(0.75) and float(spearman["grass"][0]) == pytest.approx(0.0)
    assert float(spearman["mean over categories"][0]) == pytest.approx(0.375)
    markdown = (out / "tables" / "paper_textures_selection_spearman.md").read_text()
    assert "| brick | +0.75 | 0: +0.50, 1: +1.00 | 3, 4 |" in markdown
    assert "| **mean over categories** | +0.38 | 0: +0.75, 1: +0.00 |" in markdown
    paired = (out / "tables" / "paper_textures_selection_choice_paired.md").read_text()
    assert "| **mean (pooled)** | 0.0 [" in paired and "| brick | +3.0 [" in paired
    assert "| Δ label-free choice | verdict (choice) | Δ oracle (test set) | verdict (oracle) |" in paired
    report = (out / "report.html").read_text()
    assert "*label-free choice*" not in report and "label-free choice</em> changes mean Image AUROC by 0.0" in report
    assert "Spearman rank correlation of +0.38 on average" in report
    digest = (out / "digest.md").read_text()
    assert "oracle (test set)" in digest and "0: +0.50, 1: +1.00" in digest


def test_backbone_options_without_weights_are_left_out_of_both_the_plan_and_the_select_job(tmp_path) -> None:
    """The study's weights check decides once: an option it refuses (wrn50 here) and every fine-tuned option (its
    checkpoint is outside the study) are neither planned nor scored: the select job's space lists the rest."""
    plan = build_plan(load_study("selection"), tmp_path, {"textures": ["brick"], "elpv": ["poly"]},
                      check=lambda name, dataset: "weights not available" if name == "wrn50" else None)
    names = list(plan.comparisons["textures/selection"]["selection"]["candidates"])
    assert "backbone:backbone=resnet18" in names and not any("wrn50" in n or "finetuned" in n for n in names)
    select = next(job for job in plan.jobs if job.id == "textures/selection/select")
    cfg = _compose("select", select.overrides)
    assert [list(o) for o in cfg.select.space.backbones] == [["backbone=effnet_lite0"], ["backbone=resnet18"]]
    arms = {job.arm for job in plan.jobs if job.comparison == "selection" and job.kind == "patchcore"}
    assert "backbone:backbone=resnet18" in arms and not any("wrn50" in arm for arm in arms)
    # the options left out are the comparison's skipped arms, with why (the report's "not run" table)
    skipped = {(row["arm"], row["reason"]) for row in plan.skipped if row["comparison"] == "selection"}
    assert ("backbone:backbone=wrn50", "weights not available") in skipped
    assert any(arm.startswith("backbone:backbone=finetuned") and "outside the study" in why for arm, why in skipped)
