"""Tabulate ImageNet vs rotation vs CutMix-contrastive: proxy scores next to test scores, per category.

    python experiments/finetune_compare.py outputs/finetune_compare     (what `make finetune-compare` runs last)
    python experiments/finetune_compare.py studies/default              (the study's `finetuning` comparison)

Reads the fine-tuning sidecars ``seed<k>/<method>/<base>/<category>.json`` (the selected step's proxy
image/pixel AUROC; step 0's are the ImageNet weights' proxy scores) and PatchCore's ``results.json`` (test
image/pixel AUROC). In a `make finetune-compare` folder they are ``seed*/`` and ``patchcore/**``; in a study
folder (it holds ``study.json``) ``checkpoints/seed*/`` and the runs of the ``baseline`` and ``finetuning``
comparisons (there the ImageNet row's spread is over PatchCore's seeds, the fine-tuned rows' over the seed
shared by fine-tuning and PatchCore). Prints a Markdown table, mean ± population std over the seeds (one
seed shows no ±) and the selected steps, then how often the proxy's change agreed in sign with the test's.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METHODS = ("imagenet", "rotation", "cutmix_contrastive")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
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
        cell["steps"].append(f"{record['selected_step']}/{record['steps']}")
        start = table[(record["category"], "imagenet")]
        if not start["proxy_image"]:  # step 0 is the same pretrained network for every method and seed
            start["proxy_image"].append(selection["start"]["image_auroc"])
            start["proxy_pixel"].append(selection["start"]["pixel_auroc"])
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


def agreement(table: dict) -> tuple[int, int]:
    """(agreeing, compared): fine-tuned (category, method) cells whose mean proxy image-AUROC change over step 0
    and mean test image-AUROC change over ImageNet have the same sign (both zero counts as agreeing)."""
    agreeing = compared = 0
    for (category, method), cell in table.items():
        start = table.get((category, "imagenet"))
        if method == "imagenet" or start is None:
            continue
        values = [_mean(cell["proxy_image"]), _mean(start["proxy_image"]),
                  _mean(cell["test_image"]), _mean(start["test_image"])]
        if None in values:
            continue
        proxy_change, test_change = values[0] - values[1], values[2] - values[3]
        sign = lambda x: (x > 1e-9) - (x < -1e-9)  # noqa: E731 - AUROCs differing below 1e-9 are equal
        compared += 1
        agreeing += sign(proxy_change) == sign(test_change)
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
        lines += ["", f"The proxy's image-AUROC change (selected step vs step 0) and the test's (fine-tuned vs "
                      f"ImageNet) have the same sign in {agreeing} of {compared} category x method cells."]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    root = Path(argv[0] if argv else "outputs/finetune_compare")
    if not root.is_dir():
        raise SystemExit(f"error: {root} does not exist: run `make finetune-compare` (or `make study`) first")
    print(markdown(collect(root)))


if __name__ == "__main__":
    main(sys.argv[1:])
