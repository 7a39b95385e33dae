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


def test_bench_exported_times_pytorch_and_the_fast_form_interleaved(tmp_path) -> None:
    """The goal's two lines (PyTorch, ONNX Runtime float32 fast form) are medians of ``REPEATS`` interleaved runs,
    each line's ``seconds`` the median of its ``seconds_runs``; every other runtime x form x precision is one line;
    the float32 forms score as PyTorch does (a tiny ResNet18 model, random bank, 32 px crops)."""
    from torch.utils.data import DataLoader

    from core.backbones import TorchvisionCNN
    from core.data import MVTecLayout, Preprocessing
    from core.features import PatchEmbedder
    from experiments.benchmarks.export_bench import random_bank_model
    from experiments.benchmarks.export_speed import REPEATS, RUNS, bench_exported
    from experiments.benchmarks.recording import Recorder
    from tests.conftest import write_tiny_category

    write_tiny_category(tmp_path / "data", "bottle", n_train=8, n_good=3, n_bad=3)
    model = random_bank_model(300, 64, 32, TorchvisionCNN("resnet18", ["layer2"], pretrained=False),
                              PatchEmbedder(64))
    model.preprocessing = Preprocessing(resize=32, image_size=32, mean=model.mean, std=model.std)
    layout = MVTecLayout("folder", str(tmp_path / "data"), ["bottle"], "good", 32, 32, None)
    test = DataLoader(layout.test_set("bottle", model.preprocessing), batch_size=4)
    train_paths = [sample.path for sample in layout.train_samples("bottle")]
    rec = Recorder(tmp_path / "out")
    bench_exported(rec, model, test, train_paths, batch_size=4, aggregation="official")
    lines = {line["variant"]: line for line in rec.lines}
    for variant in (PYTORCH, FAST_F32_ORT):
        runs = lines[variant]["seconds_runs"]
        assert len(runs) == REPEATS and lines[variant]["seconds"] == sorted(runs)[REPEATS // 2]
    for _, _, _, label in RUNS:
        line = lines[f"{label} (preloaded crops)"]
        assert line["n"] == 6
        if "float32" in label or "f32" in label:
            assert line["max_rel_score_diff"] < 1e-5 and line["max_rel_map_diff"] < 1e-5
    assert sum("batches of" in variant for variant in lines) == 6
