"""experiments/harness/overrides.py: old setting names and model-mixing sweeps refused before Hydra composes,
with the fix in the message, by the entry point itself in well under a second (no torch import)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.harness.overrides import mixed_models, refuse_bad_overrides, renamed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("override", "fixed"), [
    ("patchcore.num_neighbors=3", "patchcore.scoring.num_neighbors=3"),
    ("patchcore.patch_size=5", "patchcore.embedder.patch_size=5"),
    ("patchcore.aggregation=channel_mean", "patchcore.embedder.aggregation=channel_mean"),
    ("+patchcore.distance=cosine", "+patchcore.scoring.distance=cosine"),
    ("model.epochs=2", "cae.epochs=2"),
    ("memory=faiss", "search=faiss"),
    ("memory.nprobe=4", "search.nprobe=4"),
    ("method.lr=1e-4", "method.train.lr=1e-4"),
    ("method.l2sp_weight=0", "method.train.l2sp_weight=0"),
    ("method.temperature=0.1", "method.objective.temperature=0.1"),
])
def test_old_names_give_the_new_one(override: str, fixed: str) -> None:
    assert renamed(override).endswith(f"write {fixed}")


@pytest.mark.parametrize("override", ["patchcore.scoring.num_neighbors=3", "model=cae", "cae.epochs=2",
                                      "search=faiss", "memoryless=1", "patchcore.embedder.patch_size=5"])
def test_current_names_pass(override: str) -> None:
    assert renamed(override) is None


def test_a_sweep_mixing_models_with_one_model_s_settings_is_refused() -> None:
    assert "sweep each model in a run of its own" in mixed_models(["model=patchcore,cae",
                                                                   "patchcore.scoring.num_neighbors=1,3"])
    assert mixed_models(["model=patchcore,cae", "coreset.ratio=0.1"]) is None  # shared settings are fine
    assert mixed_models(["model=cae", "cae.epochs=2"]) is None
    with pytest.raises(SystemExit, match="cae.epochs"):
        refuse_bad_overrides(["-m", "model=cae,patchcore", "cae.epochs=1,2"])


@pytest.mark.parametrize(("script", "old", "new"), [
    ("experiments/main.py", "patchcore.num_neighbors=3", "patchcore.scoring.num_neighbors"),
    ("experiments/finetune.py", "method.lr=1e-4", "method.train.lr"),
])
def test_the_entry_point_refuses_an_old_name_at_once(script: str, old: str, new: str) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, script, old, "category=brick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    took = time.perf_counter() - started
    assert done.returncode != 0
    assert f"{old.split('=')[0]} was renamed {new}" in done.stderr
    assert took < 1.0, f"{took:.2f} s: the check should run before torch is imported"
