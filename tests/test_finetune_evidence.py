"""experiments/reporting/finetune_evidence.py: the proxy-vs-test agreement (Spearman and sign agreement, by hand)
and the training-length curve's monitors, from hand-made sidecars, proxy logs and test rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from experiments.reporting.comparisons import Arm, Comparison
from experiments.reporting.data import Run
from experiments.reporting.finetune_evidence import (
    Unit,
    agreement,
    agreement_table,
    curve_table,
    same_sign,
    tuned_points,
    units,
)

START = 0.80  # every sidecar's proxy score at step 0


def _sidecar(root: Path, name: str, seed: int, category: str, gain: float, step: int, steps: int = 40,
             weights: float = 0.0, last: float = 0.0) -> Path:
    folder = root / name / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{category}.json").write_text(json.dumps({
        "complete": True, "category": category, "steps": steps, "selected_step": step,
        "final_accuracy_mean": 0.3, "chance_accuracy": 0.25,
        "selection": {"start": {"score": START, "effective_rank": 100.0},
                      "proxy": {"score": START + gain},
                      "monitors": {"weight_distance_rel": weights, "effective_rank": 90.0},
                      "proxy_log": f"{category}.proxy.jsonl"}}))
    (folder / f"{category}.proxy.jsonl").write_text(
        json.dumps({"step": 0, "weight_distance_rel": 0.0, "effective_rank": 100.0}) + "\n"
        + json.dumps({"step": steps, "weight_distance_rel": last, "effective_rank": 80.0}) + "\n")
    return folder / "all.pt"


def _arm(name: str, tests: dict[tuple[int, str], float], checkpoints: dict[int, Path] | None = None) -> Arm:
    """An arm: its tidy rows (seed, category, image_auroc) and, when fine-tuned, a run per seed naming its
    checkpoint (the sidecars lie next to it)."""
    rows = pd.DataFrame([{"seed": s, "category": c, "image_auroc": v} for (s, c), v in tests.items()])
    runs = []
    for seed, checkpoint in (checkpoints or {}).items():
        categories = {c: {} for (s, c) in tests if s == seed}
        runs.append(Run(Path(f"/runs/{name}_{seed}"), {"config": {"seed": seed, "backbone": {
            "checkpoint": str(checkpoint)}}, "categories": categories}, None))
    return Arm(name, rows, runs)


@pytest.fixture
def comparisons(tmp_path) -> list[Comparison]:
    """Four (arm, category) units with proxy gains 0.01, 0, 0.03, 0.005 and test gains +0.5, 0, +1.0, -0.3
    points (rotation over two seeds, CutMix over one); the CutMix arm appears again in a second comparison."""
    baseline = _arm("baseline", {(0, "a"): 0.800, (1, "a"): 0.810, (0, "b"): 0.900, (1, "b"): 0.900})
    rotation = _arm("rotation", {(0, "a"): 0.804, (1, "a"): 0.816, (0, "b"): 0.900, (1, "b"): 0.900}, {
        seed: _sidecar(tmp_path, "rotation", seed, "a", gain, 20 * seed) for seed, gain in ((0, 0.02), (1, 0.0))})
    for seed in (0, 1):  # b: step 0 kept in both seeds
        _sidecar(tmp_path, "rotation", seed, "b", 0.0, 0)
    cutmix = _arm("cutmix", {(0, "a"): 0.810, (0, "b"): 0.897},
                  {0: _sidecar(tmp_path, "cutmix", 0, "a", 0.03, 40, weights=0.004, last=0.006)})
    _sidecar(tmp_path, "cutmix", 0, "b", 0.005, 40)
    return [Comparison("finetuning", "Fine-tuned", [baseline, rotation, cutmix], dataset="textures"),
            Comparison("again", "Again", [baseline, cutmix], dataset="textures")]


def test_units_average_gains_over_seeds_and_count_a_checkpoint_once(comparisons) -> None:
    found = units([p for c in comparisons for p in tuned_points(c)])
    assert [(u.arm, u.category, u.seeds, u.kept_start) for u in found] == [
        ("rotation", "a", 2, False), ("rotation", "b", 2, True), ("cutmix", "a", 1, False), ("cutmix", "b", 1, False)]
    assert [u.proxy_gain for u in found] == pytest.approx([0.01, 0.0, 0.03, 0.005])
    assert [u.test_gain for u in found] == pytest.approx([0.5, 0.0, 1.0, -0.3])


def test_spearman_and_sign_agreement_by_hand(comparisons) -> None:
    stats = agreement(units([p for c in comparisons for p in tuned_points(c)]))
    # ranks: proxy [3, 1, 4, 2], test [3, 2, 4, 1]; sum d^2 = 2; rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert stats["spearman"] == pytest.approx(0.8)
    # signs: (+,+), (0,0), (+,+), (+,-): 3 agree; rotation/b kept step 0
    assert (stats["n"], stats["same_sign"], stats["kept_start"]) == (4, 3, 1)
    table = agreement_table(comparisons)
    assert [cell.text for cell in table.rows[0]] == ["textures", "4", "0.80", table.rows[0][3].text, "3 of 4", "1"]


def test_same_sign_treats_rounding_as_no_change() -> None:
    assert same_sign([(0.0, 5e-10), (1e-3, -2e-3), (-1e-3, -1e-3)]) == 2


def test_too_few_units_give_no_correlation() -> None:
    two = [Unit("d", "x", "a", 1, 0.1, 1.0, False), Unit("d", "x", "b", 1, 0.2, 2.0, False)]
    assert agreement(two)["spearman"] is None and agreement(two)["same_sign"] == 2


def test_curve_table_reports_weight_change_and_rank_per_step_count(tmp_path) -> None:
    baseline = _arm("baseline", {(0, "a"): 0.800, (1, "a"): 0.810})
    long = _arm("rotation 200 steps", {(0, "a"): 0.790, (1, "a"): 0.812}, {
        seed: _sidecar(tmp_path, "r200", seed, "a", 0.01, step, steps=200, weights=w, last=0.02)
        for seed, step, w in ((0, 120, 0.010), (1, 200, 0.014))})
    curve = Comparison("training_length", "Length", [baseline, long], dataset="elpv",
                       points={"baseline": ("baseline", 0), "rotation 200 steps": ("rotation", 200)})
    table = curve_table(curve)
    assert [cell.text for cell in table.rows[0]] == [
        "rotation / a", "200", "120/200", "0.0120", "0.0200", "100 / 90 / 80", "0.30 (0.25)", "-0.40", "2"]


def test_written_text_quotes_the_same_agreement_per_dataset(comparisons) -> None:
    """claims.Quantities' proxy quantities are the agreement above (rho 0.8, 3 of 4 signs, 4 points, step 0 kept
    once), on the dataset and pooled; a dataset without fine-tuned arms is a LookupError (a claim that fails)."""
    from experiments.reporting.claims import Quantities

    quantities = Quantities(comparisons)
    for dataset in ("textures", "all"):
        assert quantities.value(f"proxy_spearman({dataset})") == pytest.approx(0.8)
        assert [quantities.value(f"{name}({dataset})") for name in ("proxy_same_sign", "proxy_points",
                                                                    "proxy_kept")] == [3, 4, 1]
    with pytest.raises(LookupError, match="no fine-tuned arm with a checkpoint record on 'elpv'"):
        quantities.value("proxy_points(elpv)")


def test_written_text_quotes_the_checkpoint_records(comparisons) -> None:
    """The fine-tuned arms' records by hand: rotation has 4 checkpoints (2 seeds x a, b), three kept step 0
    (b in both seeds, a in seed 0); CutMix's weights moved by 0.6 % at the last evaluation; accuracy 0.3."""
    from experiments.reporting.claims import Quantities, printed

    quantities = Quantities(comparisons)
    assert quantities.value("checkpoints(textures/finetuning | rotation)") == 4
    assert quantities.value("kept_pretrained(textures/finetuning | rotation)") == 3
    assert quantities.value("weight_change(textures/finetuning | cutmix)") == pytest.approx(0.6)
    assert printed(quantities.value("train_accuracy(textures/finetuning | rotation)"), "train_accuracy(x)") == "0.30"
    assert quantities.value("chance_accuracy(textures/finetuning | rotation)") == pytest.approx(0.25)
    with pytest.raises(LookupError, match="no fine-tuned checkpoint"):
        quantities.value("checkpoints(textures/finetuning | baseline)")
