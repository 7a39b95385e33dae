"""Thresholds in evaluation runs, the CAE baseline through the entry point, and experiments/predict.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.model_files import write_manifest
from core.patchcore import ModelMismatchError
from experiments.harness.fit_and_evaluate import run
from experiments.harness.prediction import predict
from tests.conftest import for_model, write_tiny_category

REPO = Path(__file__).resolve().parents[1]
TINY = ("dataset=folder", "dataset.resize=64", "dataset.image_size=64", "backbone=resnet18",
        "backbone.pretrained=false", "patchcore.embedder.embed_dim=64", "coreset.ratio=0.5", "logger=none", "viz.n=0")


def tiny_run(tmp_path: Path, make_config, *extra: str, n_train: int = 10) -> dict:
    write_tiny_category(tmp_path / "data", "widget", n_train=n_train, n_good=3, n_bad=3)
    cfg = make_config(*for_model(TINY, f"dataset.root={tmp_path / 'data'}", "category=widget", *extra))
    return run(cfg, tmp_path / "run")


def test_nominal_sigma_holds_out_validation_images(tmp_path, make_config) -> None:
    results = tiny_run(tmp_path, make_config, "threshold=nominal_sigma", "threshold.k=2")
    entry = results["categories"]["widget"]
    threshold = entry["threshold"]
    assert threshold["rule"] == "nominal_sigma" and threshold["optimistic"] is False and threshold["k"] == 2
    assert threshold["n_validation"] == 1 and entry["n_train"] == 9  # 10% of 10 held out of the bank
    assert entry["bank_size"] == int(9 * 64 * 0.5)
    confusion = threshold["confusion"]
    assert sum(confusion.values()) == entry["n_test"] == 6
    assert confusion["tp"] + confusion["fn"] == 3
    # the decisions agree with scores.csv and the stored threshold
    with (tmp_path / "run" / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    flagged = sum(float(r["image_score"]) >= threshold["image_threshold"] for r in rows)
    assert flagged == confusion["tp"] + confusion["fp"]
    assert threshold["pixel_threshold"] is not None


def test_f1_optimal_is_labelled_optimistic(tmp_path, make_config) -> None:
    entry = tiny_run(tmp_path, make_config, "threshold=f1_optimal")["categories"]["widget"]
    assert entry["threshold"]["optimistic"] is True and entry["threshold"]["n_validation"] == 0
    assert entry["n_train"] == 10
    assert entry["threshold"]["f1"] == pytest.approx(entry["image_f1_max"])


def test_cae_baseline_through_the_entry_point(tmp_path, make_config) -> None:
    results = tiny_run(tmp_path, make_config, "model=cae", "cae.image_size=32", "cae.latent_dim=8",
                       "cae.epochs=2", n_train=4)
    entry = results["categories"]["widget"]
    assert entry["bank_size"] is None and entry["timings_s"]["train"] > 0
    assert 0.0 <= entry["image_auroc"] <= 1.0 and entry["aupro"] is not None


@pytest.fixture
def saved_model(tmp_path, make_config) -> Path:
    tiny_run(tmp_path, make_config, "threshold=nominal_quantile", "threshold.quantile=0.5", "save_model=true")
    return tmp_path / "run" / "models" / "widget"


def test_predict_matches_the_evaluation_run(saved_model, tmp_path) -> None:
    test_dir = tmp_path / "data" / "widget" / "test"
    images = [str(test_dir / "good"), str(test_dir / "spot" / "*.png")]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    wide = Image.fromarray((np.random.default_rng(0).random((80, 120, 3)) * 255).astype(np.uint8), mode="RGB")
    wide.save(tmp_path / "wide.png")
    rows = predict(saved_model, [*images, str(tmp_path / "broken.png"), str(tmp_path / "wide.png")],
                   tmp_path / "preds", progress=False)
    with (tmp_path / "run" / "scores.csv").open() as handle:
        expected = {r["path"]: float(r["image_score"]) for r in csv.DictReader(handle)}
    scored = {r["path"]: r for r in rows}
    assert set(expected) <= set(scored) and len(rows) == 7
    for path, score in expected.items():
        assert scored[path]["score"] == pytest.approx(score, rel=1e-5)
    threshold = json.loads((saved_model / "model.json").read_text())["metadata"]["threshold"]
    for row in rows:
        assert row["decision"] == ("anomalous" if row["score"] >= threshold["image_threshold"] else "nominal")
        mask = Image.open(tmp_path / "preds" / row["mask"])
        source = Image.open(row["path"])
        assert mask.size == source.size and Image.open(tmp_path / "preds" / row["heatmap"]).size == source.size
    with (tmp_path / "preds" / "skipped.csv").open() as handle:
        skipped = list(csv.DictReader(handle))
    assert [Path(r["path"]).name for r in skipped] == ["broken.png"] and "cannot read image" in skipped[0]["reason"]
    assert (tmp_path / "preds" / "predictions.csv").is_file()


def test_predict_refuses_a_mismatched_model(saved_model, tmp_path) -> None:
    record = json.loads((saved_model / "model.json").read_text())
    record["embedder"]["embed_dim"] = 32  # the bank holds 64-d features
    (saved_model / "model.json").write_text(json.dumps(record))
    write_manifest(saved_model)  # edited on purpose: re-sealed, so the checks behind the manifest are reached
    with pytest.raises(ModelMismatchError, match="does not match this code"):
        predict(saved_model, str(tmp_path / "data" / "widget" / "test" / "good"), tmp_path / "preds")
    record["extractor"]["kwargs"]["depth"] = 3  # an argument this code does not know
    (saved_model / "model.json").write_text(json.dumps(record))
    write_manifest(saved_model)
    with pytest.raises(ModelMismatchError, match="cannot be built by this code"):
        predict(saved_model, str(tmp_path / "data" / "widget" / "test" / "good"), tmp_path / "preds")


def test_predict_command_line(saved_model, tmp_path) -> None:
    command = [sys.executable, str(REPO / "experiments" / "predict.py"), f"model_dir={saved_model}",
               f"images={tmp_path / 'data' / 'widget' / 'test' / 'spot'}", f"out={tmp_path / 'cli'}", "progress=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 images scored" in done.stdout
    assert len(list((tmp_path / "cli").glob("*_mask.png"))) == 3
