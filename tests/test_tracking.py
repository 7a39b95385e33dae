"""The logger group: offline W&B writes a run folder mirroring results.json, logger=none touches nothing,
and a missing or failing wandb only warns."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from experiments.harness.fit_and_evaluate import run
from experiments.harness.tracking import NoLogger, WandbLogger, make_tracker
from tests.conftest import write_tiny_category

TINY = ("dataset=folder", "dataset.resize=64", "dataset.image_size=64", "backbone=resnet18",
        "backbone.pretrained=false", "patchcore.embedder.embed_dim=64", "coreset.ratio=0.5", "category=widget",
        "viz.n=2")


@pytest.fixture
def wandb_home(tmp_path, monkeypatch) -> Path:
    """W&B's own settings/cache folders inside tmp_path, and no WANDB_MODE from the environment."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    write_tiny_category(tmp_path / "data", "widget")
    return tmp_path


def _tracked_run(make_config, root: Path, *overrides: str) -> tuple[dict, object, Path]:
    cfg = make_config(*TINY, f"dataset.root={root / 'data'}", *overrides)
    run_dir = root / "run"
    tracker = make_tracker(cfg, run_dir)
    results = None
    try:
        results = run(cfg, run_dir, tracker)
    finally:
        tracker.finish(results)
    return results, tracker, run_dir


def test_wandb_offline_writes_a_run_folder(wandb_home, make_config) -> None:
    pytest.importorskip("wandb")
    results, tracker, run_dir = _tracked_run(make_config, wandb_home, "logger=wandb")
    assert isinstance(tracker, WandbLogger) and tracker.mode == "offline" and not tracker.disabled
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and list(folders[0].glob("run-*.wandb"))
    media = folders[0] / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) == 2  # the viz.n maps of the category
    metrics_table = next((media / "table").glob("metrics_*.table.json"))
    table = json.loads(metrics_table.read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["category"] == "widget"
    assert row["image_auroc"] == pytest.approx(results["categories"]["widget"]["image_auroc"])  # a mirror
    scores = json.loads(next((media / "table").glob("scores_*.table.json")).read_text())
    assert len(scores["data"]) == results["categories"]["widget"]["n_test"]
    assert json.loads((run_dir / "results.json").read_text())["complete"] is True


def test_logger_none_touches_nothing(wandb_home, make_config) -> None:
    before = set(wandb_home.rglob("*"))
    _, tracker, run_dir = _tracked_run(make_config, wandb_home, "logger=none")
    assert type(tracker) is NoLogger
    created = {p.relative_to(wandb_home) for p in set(wandb_home.rglob("*")) - before}
    assert not [p for p in created if "wandb" in str(p)]
    assert {p.parts[1] for p in created if len(p.parts) > 1} == {"results.json", "scores.csv", "maps"}


def test_wandb_mode_offline_unless_asked(monkeypatch, make_config) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert make_config().logger.mode == "offline"
    assert make_config("logger.mode=online").logger.mode == "online"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert make_config().logger.mode == "online"


def test_missing_wandb_only_warns(wandb_home, make_config, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.warns(RuntimeWarning, match="wandb is not installed"):
        results, tracker, run_dir = _tracked_run(make_config, wandb_home, "logger=wandb")
    assert tracker.disabled and results["complete"] is True and (run_dir / "results.json").is_file()
    assert not (run_dir / "wandb").exists()


def test_failing_wandb_call_only_warns(wandb_home, make_config, monkeypatch) -> None:
    calls = []

    class BrokenRun:
        id = "broken"

        def log(self, data):
            raise ConnectionError("W&B is down")

        def finish(self, exit_code=0):
            calls.append(("finish", exit_code))

    def init(**kwargs):
        calls.append(("init", kwargs["group"], kwargs["mode"]))
        return BrokenRun()

    fake = types.SimpleNamespace(init=init, Settings=lambda **kwargs: kwargs, Image=None, Table=None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.warns(RuntimeWarning, match="W&B is down"):
        results, tracker, _ = _tracked_run(make_config, wandb_home, "logger=wandb", "logger.group=sweep-7",
                                           "viz.n=0")
    assert results["complete"] is True and tracker.disabled
    assert calls == [("init", "sweep-7", "offline"), ("finish", 1)]
