"""Sweeps: presets and launchers compose, a tiny 2 x 2 multirun writes 4 records, a re-run skips all 4,
and an interrupted sweep re-run through the submitit launcher finishes only what is missing."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from experiments.harness.results import config_record
from experiments.harness.run_key import (
    BOOKKEEPING,
    config_hash,
    find_done,
    hashable_config,
    is_ignored,
    results_hash,
)
from tests.conftest import CONF_DIR, write_tiny_category

REPO = Path(__file__).resolve().parents[1]
TINY = ("dataset=folder", "dataset.resize=64", "dataset.image_size=64", "backbone=resnet18",
        "backbone.pretrained=false", "patchcore.embedder.embed_dim=64", "coreset.ratio=0.5", "num_workers=0",
        "progress=false", "logger=none", "viz.n=1")
SWEEP = ("category=alpha,beta", "backbone.layers=choice([layer2,layer3],[layer2])")


def _hydra(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _sweep(cwd: Path, sweep_dir: str, *extra: str, sweep: tuple[str, ...] = SWEEP) -> None:
    """``python experiments/main.py -m ...`` run in this process (no second torch import): argv, working
    folder, logging and Hydra's global state are restored afterwards."""
    from experiments.main import main

    saved = sys.argv, os.getcwd(), logging.root.handlers[:], logging.root.level
    sys.argv = ["experiments/main.py", "-m", f"--config-path={CONF_DIR}", *TINY, f"dataset.root={cwd / 'data'}", *sweep,
                f"hydra.sweep.dir={sweep_dir}", *extra]
    os.chdir(cwd)
    try:
        main()
    except SystemExit as error:  # Hydra exits non-zero when a job fails
        pytest.fail(f"sweep failed ({error.code}): see {cwd / sweep_dir}")
    finally:
        sys.argv, cwd_before, logging.root.handlers, level = saved
        os.chdir(cwd_before)
        logging.root.setLevel(level)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("sweeps")
    for category in ("alpha", "beta"):
        write_tiny_category(cwd / "data", category)
    _sweep(cwd, "multirun/first")
    return cwd


def test_presets_compose() -> None:
    params = _hydra("sweep=coreset").hydra.sweeper.params
    ratios = [float(r) for r in params["coreset.ratio"].split(",")]
    assert min(ratios) == 0.001 and max(ratios) == 1.0
    cold = _hydra("sweep=cold_start").hydra.sweeper.params
    assert cold["dataset.train_limit"] == "1,2,4,8,16,null" and cold["seed"] == "0,1,2"
    layers = _hydra("sweep=layers")
    assert layers.backbone.name == "wrn50"
    assert "[layer1,layer2,layer3]" in layers.hydra.sweeper.params["backbone.layers"]
    assert _hydra("sweep=layers_effnet").backbone.name == "effnet_lite0"
    compare = _hydra("sweep=compare_backbones").hydra.sweeper.params
    for backbone in compare["backbone"].split(","):  # every backbone named has its config
        assert (REPO / "conf" / "backbone" / f"{backbone}.yaml").is_file()
    plain = _hydra()
    assert plain.logger._target_.endswith("WandbLogger") and plain.force is False and plain.viz.n > 0


def test_launchers_compose() -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    assert "hydra_joblib_launcher" in _hydra("hydra/launcher=joblib").hydra.launcher._target_
    slurm = _hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.partition == "gpu"
    assert _hydra("hydra/launcher=submitit_slurm").hydra.launcher._target_.endswith("SlurmLauncher")


def test_config_hash_ignores_bookkeeping_only(make_config) -> None:
    base = make_config("category=bottle")
    assert config_hash(base) == config_hash(make_config("category=bottle", "progress=true", "num_workers=5",
                                                        "logger=none", "force=true", "viz.n=0"))
    for changed in ("coreset.ratio=0.2", "backbone.layers=[blocks.4]", "seed=1", "category=screw",
                    "dataset.train_limit=4"):
        assert config_hash(make_config("category=bottle", changed)) != config_hash(base), changed
    record = {"config": config_record(base)}  # as results.json records it
    assert results_hash(record) == config_hash(base)  # records made before config_hash was stored


def test_config_hash_ignores_nested_bookkeeping() -> None:
    """Where features are spilled or cached changes no number (nested keys, old and new names); the buffer
    dtype does (float16 moves the scores), and so does a sibling setting next to an ignored key."""
    config = {"seed": 0, "coreset": {"ratio": 0.1},
              "storage": {"dtype": "float32", "spill_dir": None, "spill_above_gb": 0, "cache_dir": None},
              "memory": {"backend": "exact", "cache_dir": None, "spill_dir": None}, "viz": {"n": 4}}
    moved = {**config, "storage": {**config["storage"], "spill_dir": "/scratch", "spill_above_gb": 2,
                                   "cache_dir": "outputs/feature_cache"},
             "memory": {**config["memory"], "cache_dir": "/cache", "spill_dir": "/spill"}, "viz": {"n": 0},
             "hydra": {"job": {"num": 3}}}
    assert config_hash(moved) == config_hash(config)
    assert hashable_config(moved)["storage"] == {"dtype": "float32"}
    assert hashable_config(moved)["memory"] == {"backend": "exact"} and "viz" not in hashable_config(moved)
    for changed in ({**config, "storage": {**config["storage"], "dtype": "float16"}},
                    {**config, "memory": {**config["memory"], "backend": "faiss"}}):
        assert config_hash(changed) != config_hash(config)
    assert is_ignored("storage.cache_dir", BOOKKEEPING) and not is_ignored("storage.cache_dirs", BOOKKEEPING)


def test_find_done_wants_a_complete_record_with_the_same_hash(tmp_path) -> None:
    config = {"seed": 0, "coreset": {"ratio": 0.1}}
    key = config_hash(config)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"config": config, "complete": False}))
    assert find_done(key, [tmp_path]) is None
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "b" / "deep" / "results.json").write_text(json.dumps({"config": config, "complete": True}))
    assert find_done(key, [tmp_path]) == (tmp_path / "b" / "deep" / "results.json").resolve()
    assert find_done(config_hash({**config, "seed": 1}), [tmp_path]) is None


def test_tiny_multirun_then_rerun_skips_all(first_sweep) -> None:
    cwd = first_sweep
    records = sorted((cwd / "multirun" / "first").glob("*/results.json"))
    assert len(records) == 4
    seen = {(r["config"]["category"], tuple(r["config"]["backbone"]["layers"]))
            for r in (json.loads(p.read_text()) for p in records) if r["complete"]}
    assert seen == {(c, layers) for c in ("alpha", "beta") for layers in (("layer2", "layer3"), ("layer2",))}
    assert all((p.parent / "maps").is_dir() for p in records)
    _sweep(cwd, "multirun/second")  # a new sweep folder: the earlier runs are found under multirun/
    second = cwd / "multirun" / "second"
    assert not list(second.glob("*/results.json"))
    assert sum("skipped: this config" in p.read_text() for p in second.glob("*/main.log")) == 4
    notes = [json.loads(p.read_text()) for p in second.glob("*/skipped.json")]
    assert len(notes) == 4 and {Path(n["same_as"]) for n in notes} == {p.resolve() for p in records}


def test_interrupted_sweep_resumes_through_submitit(first_sweep) -> None:
    """An unfinished job (complete: false) is re-run, a finished one is skipped. submitit_local runs each job
    in its own process, as submitit_slurm does on a cluster (here: the two alpha jobs, jobs 0 and 1)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cwd = first_sweep
    victim, finished = sorted((cwd / "multirun" / "first").glob("*/results.json"))[:2]
    record = json.loads(victim.read_text())
    before = record["total_time_s"]
    assert record["config"]["category"] == "alpha"
    record["complete"] = False
    victim.write_text(json.dumps(record))
    _sweep(cwd, "multirun/first", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           sweep=("category=alpha", SWEEP[1]))
    logs = [p.read_text() for p in (cwd / "multirun" / "first" / ".submitit").rglob("*_log.out")]
    assert len(logs) == 2 and sum("skipped: this config" in log for log in logs) == 1
    assert json.loads(finished.read_text())["complete"] is True
    redone = json.loads(victim.read_text())
    assert redone["complete"] is True and redone["total_time_s"] != before
    assert len(list((cwd / "multirun" / "first").glob("*/results.json"))) == 4
