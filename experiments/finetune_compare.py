"""Tabulate ImageNet vs rotation vs CutMix-contrastive: proxy scores next to test scores, per category.

    python experiments/finetune_compare.py outputs/finetune_compare     (what `make finetune-compare` runs last)
    python experiments/finetune_compare.py studies/default              (the study's `finetuning` comparison)
    python experiments/finetune_compare.py --sweep multirun/finetune/...  (a `make sweep-finetune` run: each job)

Reads the fine-tuning sidecars ``seed<k>/<method>/<base>/<category>.json`` (the selected step's proxy
image/pixel AUROC; step 0's are the ImageNet weights' proxy scores) and PatchCore's ``results.json`` (test
image/pixel AUROC). In a `make finetune-compare` folder they are ``seed*/`` and ``patchcore/**``; in a study
folder (it holds ``study.json``) ``checkpoints/seed*/`` and the runs of the ``baseline`` and ``finetuning``
comparisons (there the ImageNet row's spread is over PatchCore's seeds, the fine-tuned rows' over the seed
shared by fine-tuning and PatchCore). Prints a Markdown table, mean ± population std over the seeds (one
seed shows no ±) and the selected steps, then how often the proxy's change agreed in sign with the test's.
With ``--sweep``, one row per job of fine-tuning multiruns (``<sweep dir>/<job>/checkpoints/...``, the
job's ``method.*`` overrides from ``.hydra/overrides.yaml``): the selected step's proxy scores and monitors,
and the last evaluation's (what training gave without the selection, from the proxy log).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

METHODS = ("imagenet", "rotation", "cutmix_contrastive")


def _present(values: list) -> list[float]:
    return [v for v in values if v is not None]


def _mean(values: list) -> float | None:
    values = _present(values)
    return statistics.fmean(values) if values else None


def _sign(x: float) -> int:
    return (x > 1e-9) - (x < -1e-9)  # AUROCs differing below 1e-9 are equal


def _number(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _mean_std(values: list[float]) -> str:
    values = _present(values)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}"


def sources(root: Path) -> tuple[list[Path], list[Path]]:
    """(fine-tuning sidecars, PatchCore results files) of a `make finetune-compare` folder or a study folder."""
    if (root / "study.json").is_file():
        results = [*sorted(root.glob("baseline/*/results.json")), *sorted(root.glob("finetuning/*/results.json"))]
        return sorted((root / "checkpoints").glob("seed*/*/*/*.json")), results
    return sorted(root.glob("seed*/*/*/*.json")), sorted(root.glob("patchcore/**/results.json"))


def collect(root: Path) -> dict:
    """(category, method) -> {"proxy_image": [...], "proxy_pixel": [...], "test_image": [...], ...}."""
    table: dict = defaultdict(lambda: defaultdict(list))
    sidecars, results_files = sources(root)
    for path in sidecars:
        record = json.loads(path.read_text())
        if not record.get("complete") or "selection" not in record:
            continue
        cell, selection = table[(record["category"], record["method"])], record["selection"]
        cell["proxy_image"].append(selection["proxy"]["image_auroc"])
        cell["proxy_pixel"].append(selection["proxy"]["pixel_auroc"])
        cell["proxy_score"].append(selection["proxy"].get("score"))
        cell["steps"].append(f"{record['selected_step']}/{record['steps']}")
        start = table[(record["category"], "imagenet")]
        if not start["proxy_image"]:  # step 0 is the same pretrained network for every method and seed
            start["proxy_image"].append(selection["start"]["image_auroc"])
            start["proxy_pixel"].append(selection["start"]["pixel_auroc"])
            start["proxy_score"].append(selection["start"].get("score"))
    for path in results_files:
        results = json.loads(path.read_text())
        if results.get("complete") is False:
            continue
        backbone = results.get("config", {}).get("backbone", {})
        method = backbone.get("method") or "imagenet"
        for category, entry in results.get("categories", {}).items():
            table[(category, method)]["test_image"].append(entry.get("image_auroc"))
            table[(category, method)]["test_pixel"].append(entry.get("pixel_auroc"))
    return table


def agreement(table: dict, proxy: str = "proxy_image") -> tuple[int, int]:
    """(agreeing, compared): fine-tuned (category, method) cells whose mean proxy change over step 0 (``proxy``:
    proxy_image, or proxy_score: what selection maximised) and mean test image-AUROC change over ImageNet have
    the same sign (both zero counts as agreeing)."""
    agreeing = compared = 0
    for (category, method), cell in table.items():
        start = table.get((category, "imagenet"))
        if method == "imagenet" or start is None:
            continue
        values = [_mean(cell.get(proxy, [])), _mean(start.get(proxy, [])),
                  _mean(cell["test_image"]), _mean(start["test_image"])]
        if None in values:
            continue
        compared += 1
        agreeing += _sign(values[0] - values[1]) == _sign(values[2] - values[3])
    return agreeing, compared


def markdown(table: dict) -> str:
    lines = ["| category | backbone | proxy image AUROC | proxy pixel AUROC | test image AUROC | test pixel AUROC "
             "| selected step / steps run |", "|---|---|---|---|---|---|---|"]
    for category in sorted({c for c, _ in table}):
        for method in METHODS:
            cell = table.get((category, method))
            if cell is None:
                continue
            scores = [_mean_std(cell[key]) for key in ("proxy_image", "proxy_pixel", "test_image", "test_pixel")]
            lines.append(f"| {category} | {method} | {' | '.join(scores)} | {', '.join(cell['steps']) or '-'} |")
    agreeing, compared = agreement(table)
    if compared:
        by_score, scored = agreement(table, "proxy_score")
        lines += ["", f"The proxy's image-AUROC change (selected step vs step 0) and the test's (fine-tuned vs "
                      f"ImageNet) have the same sign in {agreeing} of {compared} category x method cells"
                      + (f"; the selection score's change (what selection maximised) in {by_score} of {scored}."
                         if scored else ".")]
    return "\n".join(lines)


def _job_settings(job: Path) -> str:
    """The job's ``method.*`` overrides (what the sweep varied, plus what was fixed on the command line)."""
    path = job / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(path) if path.is_file() else []
    return ", ".join(str(o).removeprefix("method.") for o in overrides if str(o).startswith("method.")) or "defaults"


def _last_evaluation(log: Path) -> dict:
    """The last row of a proxy log (what the run would have kept without selection), {} without a log."""
    try:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def sweep_rows(sweep: Path) -> list[dict]:
    """One row per finished sidecar of the sweep's jobs, in job order."""
    rows = []
    for path in sorted(sweep.glob("*/checkpoints/*/*/*.json")):
        record = json.loads(path.read_text())
        selection = record.get("selection")
        if not record.get("complete") or not selection:
            continue
        job = path.parents[3]
        chosen, start, monitors = selection["proxy"], selection["start"], selection["monitors"]
        last = _last_evaluation(path.parent / selection.get("proxy_log", f"{record['category']}.proxy.jsonl"))
        rows.append({"sweep": sweep.name, "job": job.name, "method": record["method"], "category": record["category"],
                     "settings": _job_settings(job), "steps": f"{record['selected_step']}/{record['steps']}",
                     "image": chosen["image_auroc"], "pixel": chosen["pixel_auroc"], "score": chosen["score"],
                     "start_score": start.get("score"), "rank": monitors.get("effective_rank"),
                     "start_rank": start.get("effective_rank"), "moved": monitors.get("weight_distance_rel"),
                     "last_score": last.get("score"), "last_rank": last.get("effective_rank"),
                     "warnings": selection.get("collapse_warnings") or []})
    return rows


def sweep_markdown(rows: list[dict]) -> str:
    lines = ["| sweep | method | category | settings | selected / run steps | proxy image AUROC | proxy pixel AUROC "
             "| proxy score (step 0) | last step's proxy score | effective rank, selected / step 0 / last "
             "| \\|\\|w-w0\\|\\| / \\|\\|w0\\|\\| "
             "| collapse warnings at |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["sweep"], r["method"], r["category"], r["settings"], r["steps"], _number(r["image"]),
                 _number(r["pixel"]), f"{_number(r['score'])} ({_number(r['start_score'])})", _number(r["last_score"]),
                 " / ".join(_number(r[key], ".0f") for key in ("rank", "start_rank", "last_rank")),
                 _number(r["moved"]), ", ".join(map(str, r["warnings"])) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--sweep"]:
        folders = [Path(a) for a in argv[1:]]
        missing = [str(f) for f in folders if not f.is_dir()]
        if not folders or missing:
            raise SystemExit(f"error: give the sweep folders of `make sweep-finetune` runs (missing: {missing})")
        print(sweep_markdown([row for folder in folders for row in sweep_rows(folder)]))
        return
    root = Path(argv[0] if argv else "outputs/finetune_compare")
    if not root.is_dir():
        raise SystemExit(f"error: {root} does not exist: run `make finetune-compare` (or `make study`) first")
    print(markdown(collect(root)))


if __name__ == "__main__":
    main(sys.argv[1:])
