"""``make bench`` (issue 29): a real-image workload (ELPV mono and poly in a full run, ``--real`` for others)
whose default prediction is measured against the official-style pipeline on the same images and weights, the
scores checked equal; its goal is the ratio of its own two lines, apart from the textures workload's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from core.data import ElpvLayout
from experiments.benchmarks.prediction import OFFICIAL_STYLE
from experiments.benchmarks.real_images import RealWorkloadError, bench_real, real_dataset
from experiments.benchmarks.recording import Recorder
from experiments.benchmarks.searches import DEFAULT
from experiments.benchmarks.table import goals
from experiments.benchmarks.workload import Workload
from tests.conftest import write_tiny_category


def _line(variant: str, items_per_s: float, **extra) -> dict:
    return {"stage": "predict", "variant": variant, "items_per_s": items_per_s, "threads": 2, "n": 39,
            "aggregation": "official", "bank_size": 100, **extra}


def test_real_image_goals_are_kept_apart_from_the_textures_goal() -> None:
    lines = [_line(OFFICIAL_STYLE, 4.0, study="real:elpv:mono", ratio=0.1),
             _line(DEFAULT, 9.0, study="real:elpv:mono", ratio=0.1),
             _line(OFFICIAL_STYLE, 10.0), _line(DEFAULT, 43.0),
             _line(OFFICIAL_STYLE, 5.0, study="real:elpv:poly@0.01", ratio=0.01),
             _line(DEFAULT, 15.0, study="real:elpv:poly@0.01", ratio=0.01)]
    found = {goal["goal"]: goal for goal in goals(lines)}
    assert found["prediction vs official-style pipeline"]["ratio"] == 4.3  # the textures lines only
    mono = found["prediction vs official-style pipeline, real images (elpv:mono, coreset ratio 0.1, 100 bank "
                 "patches)"]
    poly = found["prediction vs official-style pipeline, real images (elpv:poly@0.01, coreset ratio 0.01, not the "
                 "default settings, 100 bank patches)"]
    assert (mono["ratio"], mono["target"], mono["met"]) == (2.25, 2.5, False)
    assert (poly["ratio"], poly["met"]) == (3.0, True)


def test_a_real_workload_may_name_its_bank_ratio() -> None:
    from experiments.benchmarks.real_images import DEFAULT_RATIO, bank_ratio

    assert bank_ratio("elpv:poly@0.01") == ("elpv:poly", 0.01)
    assert bank_ratio("/data/mvtec:bottle") == ("/data/mvtec:bottle", None)
    greedy = Path(__file__).resolve().parents[1] / "conf" / "coreset" / "greedy.yaml"
    assert DEFAULT_RATIO == yaml.safe_load(greedy.read_text())["ratio"]  # the default settings
    for bad in ("elpv:poly@", "elpv:poly@ten", "elpv:poly@0", "elpv:poly@1.5"):
        with pytest.raises(RealWorkloadError, match=r"coreset ratio, a number in \(0, 1\]"):
            real_dataset(bad, None)


def test_a_bad_real_workload_is_refused_with_the_fix(tmp_path) -> None:
    with pytest.raises(RealWorkloadError, match="give elpv:mono, elpv:poly or <folder>:<category>"):
        real_dataset(f"{tmp_path}:bottle", None)
    dataset, category = real_dataset("elpv:poly", 20)
    assert isinstance(dataset, ElpvLayout) and category == "poly"
    write_tiny_category(tmp_path, "bottle")
    dataset, category = real_dataset(f"{tmp_path}:bottle", None)
    assert category == "bottle" and len(dataset.train_set(category, None)) == 3


def test_real_workload_measures_both_pipelines_at_equal_scores(tmp_path) -> None:
    """A tiny MVTec-layout folder: both lines present, the default's image AUROC and scores those of the
    official-style pipeline (every distance in all dimensions) to float rounding."""
    write_tiny_category(tmp_path / "data", "bottle", n_train=4, n_good=3, n_bad=3)
    rec = Recorder(tmp_path / "out")
    torch.manual_seed(0)
    bench_real(rec, Workload(tmp_path, {}, torch.device("cpu")), f"{tmp_path / 'data'}:bottle", ratio=0.5)
    lines = {line["variant"]: line for line in rec.lines}
    official, default = lines[OFFICIAL_STYLE], lines[DEFAULT]
    assert official["study"] == default["study"] == f"real:{tmp_path / 'data'}:bottle"
    assert official["n"] == default["n"] == 6 and default["train_images"] == 4
    assert default["auroc_diff"] == 0.0 and default["max_rel_map_diff"] < 1e-4
    # squared distances of ~6e4: the scores agree to float32 rounding relative to the largest map value
    largest = default["max_abs_map_diff"] / default["max_rel_map_diff"]
    assert largest > 1e3 and default["max_abs_score_diff"] <= 1e-6 * largest


def test_bench_metrics_times_one_ranking_against_one_sort_each_on_the_same_maps() -> None:
    """Two ``evaluate`` lines of the same maps; a disagreement between the two ways would stop the bench."""
    import numpy as np

    from core.detector import Predictions
    from experiments.benchmarks.evaluation import ONE_RANKING, ONE_SORT_EACH, REPEATS, bench_metrics

    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[2, 3:7, 3:9] = masks[3, 10:15, 1:4] = True
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)
    predictions = Predictions(maps.reshape(4, -1).max(axis=1), maps, np.array([0, 0, 1, 1]), masks,
                              np.ones(4, bool))
    rec = Recorder(None)
    bench_metrics(rec, predictions, aggregation="official")
    assert [line["variant"] for line in rec.lines] == [ONE_RANKING, ONE_SORT_EACH]
    for line in rec.lines:
        assert line["stage"] == "evaluate" and line["n"] == 4 and line["pixels"] == 4 * 16 * 16
        assert len(line["seconds_runs"]) == REPEATS and line["seconds"] == pytest.approx(
            float(np.median(line["seconds_runs"])), abs=1e-3)


def test_a_full_run_measures_elpv_unless_told_otherwise() -> None:
    """Plain `make bench` prints every goal line in one run, the real-image ones included; --quick, --skip real and
    an explicit --real change that."""
    from experiments.bench import parse, real_workloads

    assert real_workloads(parse([])) == ["elpv:mono", "elpv:poly"]
    assert real_workloads(parse(["--quick"])) == []
    assert real_workloads(parse(["--skip", "real", "scaling"])) == []
    assert real_workloads(parse(["--real", "elpv:poly@0.01"])) == ["elpv:poly@0.01"]
    assert real_workloads(parse(["--quick", "--real", "elpv:mono"])) == ["elpv:mono"]
    assert real_workloads(parse(["--real"])) == []  # --real with nothing: none
