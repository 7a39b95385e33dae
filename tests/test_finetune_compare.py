"""experiments/finetune_compare.py: the README's "Does fine-tuning help?" table, from hand-made sidecars and
results files in both layouts it reads (a `make finetune-compare` folder and a study folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.finetune_compare import agreement, collect, markdown, sweep_markdown, sweep_rows


def _sidecar(path: Path, category: str, method: str, proxy: tuple[float, float], start: tuple[float, float],
             step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "complete": True, "category": category, "method": method, "selected_step": step, "steps": 40,
        "selection": {"proxy": {"image_auroc": proxy[0], "pixel_auroc": proxy[1]},
                      "start": {"image_auroc": start[0], "pixel_auroc": start[1]}}}))


def _results(path: Path, method: str | None, scores: dict[str, tuple[float, float]], complete: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone = {"name": method or "effnet_lite0", **({"method": method} if method else {})}
    path.write_text(json.dumps({"complete": complete, "config": {"backbone": backbone}, "categories": {
        c: {"image_auroc": i, "pixel_auroc": p} for c, (i, p) in scores.items()}}))


def _run(arm: Path, seed: int) -> Path:
    """A run folder as the study names it: <comparison>/<arm>_seed<s>/results.json."""
    return arm.parent / f"{arm.name}_seed{seed}" / "results.json"


def _fill(checkpoints: Path, patchcore: dict[str, Path]) -> None:
    start = (0.90, 0.95)
    for seed, (proxy, test) in enumerate([(0.92, 0.80), (0.94, 0.84)]):
        _sidecar(checkpoints / f"seed{seed}" / "rotation" / "effnet_lite0" / "grass.json", "grass", "rotation",
                 (proxy, 0.96), start, 20 * seed)
        _results(_run(patchcore["rotation"], seed), "rotation", {"grass": (test, 0.97)})
    _sidecar(checkpoints / "seed0" / "cutmix_contrastive" / "effnet_lite0" / "grass.json", "grass",
             "cutmix_contrastive", (0.90, 0.94), start, 0)
    _results(_run(patchcore["cutmix_contrastive"], 0), "cutmix_contrastive", {"grass": (0.81, 0.96)})
    for seed, test in enumerate([0.81, 0.83]):
        _results(_run(patchcore["imagenet"], seed), None, {"grass": (test, 0.96)})


def _check(table: dict) -> None:
    rotation, imagenet = table[("grass", "rotation")], table[("grass", "imagenet")]
    assert rotation["proxy_image"] == [0.92, 0.94] and rotation["test_image"] == [0.80, 0.84]
    assert rotation["steps"] == ["0/40", "20/40"]
    assert imagenet["proxy_image"] == [0.90] and imagenet["test_image"] == [0.81, 0.83]
    # rotation: proxy +0.03 and test +0.00 (0.82 vs 0.82): disagree; cutmix: proxy 0, test -0.01: disagree
    assert agreement(table) == (0, 2)
    text = markdown(table)
    # mean ± population std over the two seeds, computed by hand: 0.93 ± 0.01 and 0.82 ± 0.02
    assert "| grass | rotation | 0.9300 ± 0.0100 | 0.9600 ± 0.0000 | 0.8200 ± 0.0200 | 0.9700 ± 0.0000 " \
           "| 0/40, 20/40 |" in text
    assert "| grass | imagenet | 0.9000 | 0.9500 | 0.8200 ± 0.0100 | 0.9600 ± 0.0000 | - |" in text
    assert "same sign in 0 of 2 category x method cells" in text


def test_compare_folder(tmp_path: Path) -> None:
    _fill(tmp_path, {m: tmp_path / "patchcore" / m for m in ("imagenet", "rotation", "cutmix_contrastive")})
    _check(collect(tmp_path))


def test_study_folder_reads_baseline_and_finetuning_only(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text("{}")
    _fill(tmp_path / "checkpoints", {"imagenet": tmp_path / "baseline" / "baseline",
                                     "rotation": tmp_path / "finetuning" / "rot",
                                     "cutmix_contrastive": tmp_path / "finetuning" / "cut"})
    # other comparisons and unfinished runs are not part of the table
    _results(tmp_path / "variants" / "cosine" / "results.json", None, {"grass": (0.10, 0.10)})
    _results(tmp_path / "baseline" / "unfinished" / "results.json", None, {"grass": (0.10, 0.10)}, complete=False)
    _sidecar(tmp_path / "checkpoints" / "l2sp_0" / "seed0" / "rotation" / "effnet_lite0" / "grass.json", "grass",
             "rotation", (0.10, 0.10), (0.90, 0.95), 40)
    _check(collect(tmp_path))


def test_agreement_counts_matching_signs() -> None:
    table = {("a", "imagenet"): {"proxy_image": [0.5], "test_image": [0.5]},
             ("a", "rotation"): {"proxy_image": [0.6], "test_image": [0.7]},
             ("b", "imagenet"): {"proxy_image": [0.5], "test_image": [0.5]},
             ("b", "rotation"): {"proxy_image": [0.5], "test_image": [0.5]}}
    assert agreement(table) == (2, 2)
    table[("a", "imagenet")]["proxy_score"], table[("a", "rotation")]["proxy_score"] = [0.5], [0.4]  # down, test up
    assert agreement(table, "proxy_score") == (0, 1)  # b has no selection score: not compared
    assert agreement({("a", "rotation"): {"proxy_image": [0.6], "test_image": [0.7]}}) == (0, 0)


def test_sweep_rows_read_each_job(tmp_path: Path) -> None:
    sweep = tmp_path / "rotation_l2sp"
    for number, (weight, score) in enumerate([(0.0, 0.91), (1.0, 0.93)]):
        job = sweep / f"{number}_rotation_textures_effnet_lite0"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- method.l2sp_weight={weight}\n- category=grass\n")
        sidecar = job / "checkpoints" / "rotation" / "effnet_lite0" / "grass.json"
        _sidecar(sidecar, "grass", "rotation", (score, 0.95), (0.90, 0.95), 20)
        record = json.loads(sidecar.read_text())
        record["selection"]["proxy"]["score"] = (score + 0.95) / 2
        record["selection"]["start"].update(score=0.925, effective_rank=300.0)
        record["selection"].update(monitors={"effective_rank": 290.0, "weight_distance_rel": 0.002},
                                   collapse_warnings=[40] if number else [])
        sidecar.write_text(json.dumps(record))
        log = [{"step": 0, "score": 0.925, "effective_rank": 300.0}, {"step": 40, "score": 0.5, "effective_rank": 99.0}]
        sidecar.with_suffix(".proxy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    (sweep / "2_unfinished" / "checkpoints" / "rotation" / "effnet_lite0").mkdir(parents=True)
    rows = sweep_rows(sweep)
    assert [r["settings"] for r in rows] == ["l2sp_weight=0.0", "l2sp_weight=1.0"]
    assert [r["score"] for r in rows] == pytest.approx([0.93, 0.94]) and rows[1]["warnings"] == [40]
    text = sweep_markdown(rows)
    assert "| rotation_l2sp | rotation | grass | l2sp_weight=1.0 | 20/40 | 0.9300 | 0.9500 | 0.9400 (0.9250) " \
           "| 0.5000 | 290 / 300 / 99 | 0.0020 | 40 |" in text


if __name__ == "__main__":
    pytest.main([__file__])
