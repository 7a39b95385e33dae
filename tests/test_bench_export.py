"""``make bench``'s exported-model lines (issue 29): the goal that the fast form runs at least at PyTorch's speed
is the ratio of two lines of the same run, and the INT8 calibration split of the bench is disjoint and seeded."""

from __future__ import annotations

from experiments.benchmarks.export_speed import FAST_F32_ORT, PYTORCH, calibration_for
from experiments.benchmarks.table import goals


def _line(variant: str, items_per_s: float, **extra) -> dict:
    return {"stage": "predict", "variant": variant, "items_per_s": items_per_s, "threads": 2, "n": 39, **extra}


def test_fast_form_goal_is_the_ratio_of_its_line_to_pytorchs() -> None:
    lines = [_line(PYTORCH, 20.0, aggregation="official"), _line(FAST_F32_ORT, 25.0, aggregation="official"),
             _line(PYTORCH, 4.0, study="wrn50"), _line(FAST_F32_ORT, 3.0, study="wrn50")]
    found = {goal["goal"]: goal for goal in goals(lines)}
    effnet = found["exported fast form (ONNX Runtime, float32) vs PyTorch"]
    wrn = found["exported fast form (ONNX Runtime, float32) vs PyTorch, WRN50"]
    assert (effnet["ratio"], effnet["met"], effnet["target"]) == (1.25, True, 1.0)
    assert (wrn["ratio"], wrn["met"]) == (0.75, False)
    assert goals([_line(PYTORCH, 20.0)]) == []  # no exported line: no goal


def test_bench_calibration_split() -> None:
    paths = [f"train/good/{i:03d}.png" for i in range(40)]
    calibration = calibration_for(paths)
    calibrating, heldout = calibration.split()
    assert (len(calibrating), len(heldout)) == (30, 10) and not set(calibrating) & set(heldout)
    assert calibration_for(paths).split() == (calibrating, heldout)  # seeded
    big = calibration_for([f"{i}.png" for i in range(411)])
    assert (big.count, big.heldout) == (64, 16)
    small = calibration_for(["a.png", "b.png", "c.png", "d.png"])
    assert (small.count, small.heldout) == (3, 1)
