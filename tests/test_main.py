"""The Hydra entry point: the run record, saved models, bad input, and failure isolation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from core.data import DatasetError
from core.patchcore import PatchCore
from experiments.harness.fit_and_evaluate import run
from tests.conftest import for_model, write_tiny_category

REPO = Path(__file__).resolve().parents[1]
TINY = ("dataset=folder", "dataset.resize=64", "dataset.image_size=64", "backbone=resnet18",
        "backbone.pretrained=false", "patchcore.embedder.embed_dim=64", "coreset.ratio=0.5")


def tiny(root: Path, *extra: str) -> tuple[str, ...]:
    return for_model(TINY, f"dataset.root={root}", *extra)


def test_tiny_run_writes_the_results_schema(tmp_path, make_config) -> None:
    write_tiny_category(tmp_path / "data", "widget")
    results = run(make_config(*tiny(tmp_path / "data", "category=widget")), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) >= {"config", "categories", "mean", "peak_rss_mb", "versions", "git_commit"}
    entry = on_disk["categories"]["widget"]
    assert (entry["n_train"], entry["n_test"]) == (3, 4)
    assert entry["bank_size"] == int(3 * 8 * 8 * 0.5)  # resnet18 layer2 grid at 64 px is 8x8
    assert set(entry["timings_s"]) == {"extract", "coreset", "predict", "evaluate"}
    for metric in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro"):
        assert 0.0 <= entry[metric] <= 1.0
        assert on_disk["mean"][metric] == entry[metric]
    assert on_disk["config"]["coreset"]["ratio"] == 0.5 and on_disk["complete"] is True
    assert on_disk["versions"]["torch"] == torch.__version__.split("+")[0] or on_disk["versions"]["torch"]
    with (tmp_path / "run" / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["defect_type"] for row in rows].count("spot") == 2 and len(rows) == 4
    assert {row["label"] for row in rows} == {"0", "1"}


def test_wrn50_random_weights_full_tiny_run(tmp_path, make_config) -> None:
    write_tiny_category(tmp_path / "data", "widget")
    cfg = make_config(*tiny(tmp_path / "data", "category=widget", "backbone=wrn50"))
    results = run(cfg, tmp_path / "run")
    assert results["categories"]["widget"]["bank_size"] == 96
    assert results["config"]["backbone"]["arch"] == "wide_resnet50_2"


def test_saved_model_reproduces_the_scores(tmp_path, make_config) -> None:
    write_tiny_category(tmp_path / "data", "widget")
    cfg = make_config(*tiny(tmp_path / "data", "category=widget", "save_model=true"))
    run(cfg, tmp_path / "run")
    model = PatchCore.load(tmp_path / "run" / "models" / "widget")
    with (tmp_path / "run" / "scores.csv").open() as handle:
        expected = {row["path"]: float(row["image_score"]) for row in csv.DictReader(handle)}
    from core.data import MVTecLayout, Preprocessing

    preprocessing = Preprocessing(**model.metadata["preprocessing"])
    layout = MVTecLayout("folder", tmp_path / "data")
    predictions = model.predict(DataLoader(layout.test_set("widget", preprocessing), batch_size=3))
    for path, score in zip(predictions.paths, predictions.image_scores):
        assert score == pytest.approx(expected[path], rel=1e-5)


def test_defects_without_masks_give_image_metrics_only(tmp_path, make_config) -> None:
    write_tiny_category(tmp_path / "data", "widget", masks=False)
    with pytest.warns(UserWarning, match="spot"):
        results = run(make_config(*tiny(tmp_path / "data", "category=widget")), tmp_path / "run")
    entry = results["categories"]["widget"]
    assert entry["image_auroc"] is not None
    assert entry["pixel_auroc"] is None and entry["aupro"] is None
    assert "no ground-truth masks" in entry["pixel_metrics_note"]


def test_failed_category_keeps_finished_ones(tmp_path, make_config) -> None:
    write_tiny_category(tmp_path / "data", "alpha")
    broken = write_tiny_category(tmp_path / "data", "beta")
    (broken / "test" / "spot" / "001.png").write_bytes(b"definitely not a png")
    results = run(make_config(*tiny(tmp_path / "data", "category=all")), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "alpha" in on_disk["categories"] and "beta" not in on_disk["categories"]
    assert "beta/test/spot/001.png" in on_disk["failed"]["beta"]
    assert on_disk["complete"] is False and results["mean"]["image_auroc"] is not None


def test_bad_ratio_rejected_before_any_work(tmp_path, make_config) -> None:
    write_tiny_category(tmp_path / "data", "widget")  # the dataset is found first (its layout names the categories)
    cfg = make_config(*tiny(tmp_path / "data", "coreset.ratio=1.5"))
    with pytest.raises(ValueError, match=r"coreset.ratio=1.5 must be in \(0, 1\]"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_root_names_path_and_layout(tmp_path, make_config) -> None:
    with pytest.raises(DatasetError) as error:
        run(make_config(*tiny(tmp_path / "nowhere", "category=widget")), tmp_path / "run")
    assert str(tmp_path / "nowhere") in str(error.value) and "train/good" in str(error.value)


def test_unknown_category_lists_valid_ones(tmp_path, make_config, textures_root) -> None:
    cfg = make_config("dataset=textures", f"dataset.root={textures_root}", "category=bottle")
    with pytest.raises(DatasetError, match="brick.*grass.*gravel.*tissue"):
        run(cfg, tmp_path / "run")


def test_empty_train_good_fails_before_work(tmp_path, make_config) -> None:
    base = write_tiny_category(tmp_path / "data", "widget")
    for image in (base / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="train/good"):
        run(make_config(*tiny(tmp_path / "data", "category=widget")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_command_line_entry_point(tmp_path) -> None:
    write_tiny_category(tmp_path / "data", "widget")
    command = [sys.executable, str(REPO / "experiments" / "main.py"), *tiny(tmp_path / "data", "category=widget"),
               "num_workers=0", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "image_auroc" in done.stdout and "mean" in done.stdout
    assert (tmp_path / "run" / "results.json").is_file()
    bad = subprocess.run([*command[:-1], "coreset.ratio=0", f"hydra.run.dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode != 0 and "coreset.ratio=0" in bad.stderr
    assert np.isfinite(json.loads((tmp_path / "run" / "results.json").read_text())["peak_rss_mb"])


def test_one_instantiate_builds_the_whole_model(make_config) -> None:
    from hydra.utils import instantiate

    from core.backbones import TorchvisionCNN
    from core.coreset import GreedyCoresetSampler
    from core.features import PatchEmbedder
    from core.search import SearchOptions

    cfg = make_config("backbone=resnet18", "backbone.pretrained=false", "backbone.layers=[layer2]",
                      "patchcore.embedder.embed_dim=32", "coreset.ratio=0.25", "coreset.method=plain", "search=faiss",
                      "patchcore.scoring.num_neighbors=2")
    model = instantiate(cfg.model)
    assert isinstance(model, PatchCore) and isinstance(model.extractor, TorchvisionCNN)
    assert model.extractor.layers == ["layer2"] and model.scoring.num_neighbors == 2
    assert isinstance(model.embedder, PatchEmbedder) and model.embedder.embed_dim == 32
    assert isinstance(model.sampler, GreedyCoresetSampler)
    assert (model.sampler.ratio, model.sampler.method) == (0.25, "plain")
    assert model.search == SearchOptions(backend="faiss", index="ivf", nlist=None, nprobe=16)


def test_former_names_keep_working(make_config) -> None:
    assert make_config("coreset.method=plain").coreset.method == "plain"  # memory=...: tests/test_overrides.py


def test_cae_runs_through_the_same_harness(tmp_path, make_config) -> None:
    write_tiny_category(tmp_path / "data", "widget")
    cfg = make_config(*tiny(tmp_path / "data", "category=widget", "model=cae", "cae.image_size=32",
                            "cae.epochs=1", "cae.latent_dim=8", "save_model=true"))
    results = run(cfg, tmp_path / "run")
    entry = results["categories"]["widget"]
    assert set(entry["timings_s"]) == {"train", "predict", "evaluate"} and entry["bank_size"] is None
    assert (entry["n_train"], entry["n_test"]) == (3, 4) and 0.0 <= entry["image_auroc"] <= 1.0
    assert (tmp_path / "run" / "models" / "widget" / "cae.safetensors").is_file()
