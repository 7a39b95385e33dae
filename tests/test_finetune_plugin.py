"""A fine-tuning method is a plug-in: the recipe "Add a fine-tuning method" of docs/architecture.md, followed as
written. Its code blocks (the objective module and its YAML) go into a copy of the tree, and its two commands
(`make finetune METHOD=<name>`, then `main.py backbone=finetuned backbone.method=<name>`) run there on a tiny
textures category, with nothing but the data, the size and the schedule overridden."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.backbones import build_extractor
from experiments.harness import finetuning
from extensions.checkpoint import load_torch
from extensions.protection import Protection

REPO = Path(__file__).resolve().parents[1]
LR = 1e-3  # the backbone's learning rate in this test: each weight moves by at most about this per Adam step
STEPS = 2


def recipe() -> str:
    """The recipe's section of docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("### Add a fine-tuning method", 1)[1]
    return re.split(r"\n#{2,3} ", section, maxsplit=1)[0]


def block(section: str, language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"the recipe should have one {language} block"
    return blocks[0]


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the code and configs, with the recipe's two files added to it."""
    copy = tmp_path / "tree"
    for folder in ("core", "extensions", "experiments", "conf"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "Makefile.finetune", copy)
    section = recipe()
    config = block(section, "yaml")
    name = yaml.safe_load(config)["name"]
    module, yaml_file = f"extensions/{name}.py", f"conf/method/{name}.yaml"
    assert f"`{module}`" in section and f"`{yaml_file}`" in section  # the files the recipe names
    assert not (copy / module).exists() and not (copy / yaml_file).exists()  # really a new method
    (copy / module).write_text(block(section, "python"))
    (copy / yaml_file).write_text(config)
    return copy


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_a_method_added_by_the_recipe_fine_tunes_and_feeds_patchcore(tree, textures_root, monkeypatch) -> None:
    commands = [shlex.split(line) for line in block(recipe(), "bash").splitlines() if line.strip()]
    make, main = commands
    name = make[make.index("finetune") + 1].removeprefix("METHOD=")
    assert make[:2] == ["make", "finetune"] and main[:2] == ["python", "experiments/main.py"]
    assert f"backbone.method={name}" in main

    # discoverable by name: the methods are listed from conf/method/ (make targets, finetune-compare, studies)
    monkeypatch.setattr(finetuning, "METHOD_DIR", tree / "conf" / "method")
    assert finetuning.method_names() == sorted(["cutmix_contrastive", "rotation", name])
    compare = run(["make", "--no-print-directory", "-n", "-f", "Makefile.finetune", "PY=python", "STAMP=",
                   "finetune-compare"], tree).stdout
    assert f"for method in {' '.join(finetuning.method_names())}; do" in compare

    data = [f"dataset.root={textures_root}", "dataset.resize=72", "dataset.image_size=64", "dataset.train_limit=6",
            "num_workers=0", "progress=false", "logger=none"]
    schedule = [f"method.train.max_steps={STEPS}", "method.train.batch_size=2", f"method.train.lr={LR}",
                "backbone.pretrained=false", "proxy.enabled=false"]  # no proxy: the last step is what is kept
    run([make[0], "--no-print-directory", "-f", "Makefile.finetune", *make[1:], f"PY={sys.executable}", "STAMP=",
         f"FINETUNE_ARGS={shlex.join(data + schedule)}"], tree)
    checkpoint = tree / "checkpoints" / name / "effnet_lite0" / "brick.pt"  # the defaults of both commands meet
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    assert sidecar["method"] == name and sidecar["steps"] == STEPS and sidecar["selected_step"] == STEPS
    assert sidecar["n_train_images"] == 6 and sidecar["config"]["method"]["objective"]["_target_"].startswith(
        f"extensions.{name}.")
    losses = [json.loads(line) for line in checkpoint.with_suffix(".loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses] == [1, 2] and all(0 <= row["accuracy"] <= 1 for row in losses)
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in losses)
    assert_moved_by_steps(load_torch(checkpoint))

    patchcore = [sys.executable, *main[1:], *data, "patchcore.embedder.embed_dim=32", "viz.n=0",
                 f"hydra.run.dir={tree / 'run'}"]
    run(patchcore, tree)
    results = json.loads((tree / "run" / "results.json").read_text())
    assert results["complete"] and set(results["categories"]) == {"brick"}
    entry = results["categories"]["brick"]
    assert all(math.isfinite(entry[key]) and 0 <= entry[key] <= 1 for key in ("image_auroc", "pixel_auroc"))
    backbone = results["config"]["backbone"]
    assert backbone["method"] == name and backbone["name"] == name and backbone["checkpoint"] == \
        f"checkpoints/{name}/effnet_lite0/brick.pt"


def assert_moved_by_steps(payload: dict) -> None:
    """The checkpoint is the base after STEPS optimiser steps: frozen weights and BatchNorm statistics untouched,
    every trainable weight moved, none by more than Adam's ~lr per step (the second step at half lr: cosine)."""
    assert payload["step"] == STEPS
    torch.manual_seed(0)  # finetune.py seeds with method.train.seed (0) right before building the base
    base = build_extractor(payload["base"])
    trainable = {id(p) for p in Protection(base, 1, True, True, 0.1).parameters()}
    trainable_names = {n for n, p in base.named_parameters() if id(p) in trainable}
    start, tuned = base.state_dict(), payload["state_dict"]
    assert set(start) == set(tuned) and trainable_names
    moved = {key for key in start if not torch.equal(start[key], tuned[key])}
    assert moved == trainable_names  # frozen stages and every buffer (running statistics) are unchanged
    largest = max((tuned[key] - start[key]).abs().max().item() for key in moved)
    assert 0 < largest <= 1.5 * LR * 1.01


@pytest.mark.slow
def test_a_method_added_by_the_recipe_runs_through_a_study_and_its_report(tree, textures_root) -> None:
    """The same new method, listed by name in a study (conf/study: `methods: [<name>]`, nothing else), goes
    finetune -> PatchCore -> study manifest -> report, where it is an arm of the fine-tuning comparison."""
    name = yaml.safe_load(block(recipe(), "yaml"))["name"]
    data = ["dataset.resize=72", "dataset.image_size=64", "dataset.train_limit=6", "num_workers=0"]
    study = {"name": "toy", "datasets": {"textures": {"category": "brick"}}, "backbone": "effnet_lite0", "seeds": [0],
             "logger": "none", "common": [*data, "patchcore.embedder.embed_dim=32", "viz.n=0"],
             "finetune_overrides": [*data, f"method.train.max_steps={STEPS}", "method.train.batch_size=2",
                                    "proxy.enabled=false"],
             "comparisons": {"tuned": {"title": "A toy method", "methods": [name]}}}
    (tree / "conf" / "study" / "toy.yaml").write_text(yaml.safe_dump(study))
    shutil.copytree(REPO / "reports" / "paper", tree / "reports" / "paper")  # the paper's written sources
    env_root = {"TEXTURES_ROOT": str(textures_root)}
    run_env([sys.executable, "experiments/study.py", "--study", "toy", "--out", "studies"], tree, env_root)
    manifest = json.loads((tree / "studies" / "toy" / "study.json").read_text())
    assert [(job["id"], job["status"]) for job in manifest["jobs"]] == [
        ("textures/baseline/baseline", "done"), (f"textures/tuned/finetune_{name}", "done"),
        (f"textures/tuned/{name}", "done")]
    assert manifest["comparisons"]["textures/tuned"]["arms"] == ["baseline", name]
    tuned = json.loads((tree / "studies" / "toy" / "textures" / "tuned" / name / "results.json").read_text())
    assert tuned["config"]["backbone"]["method"] == name
    run_env([sys.executable, "experiments/report.py", "studies/toy", "--out", "report", "--no-digest-pdf"], tree,
            env_root)
    rows = list(csv.DictReader((tree / "report" / "tables" / "sources.csv").open()))
    arms = {row.get("arm") or row.get("row") for row in rows}
    assert name in arms, sorted(arms)
    text = (tree / "report" / "report.typ").read_text()
    assert "A toy method" in text and name in text
    assert f"{100 * tuned['categories']['brick']['image_auroc']:.1f}" in text


def run_env(command: list[str], cwd: Path, extra_env: dict[str, str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(cwd), "WANDB_MODE": "disabled", **extra_env}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
