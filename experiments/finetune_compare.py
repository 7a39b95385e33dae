"""Tabulate ImageNet vs rotation vs CutMix-contrastive: proxy scores next to test scores, per category.

    python experiments/finetune_compare.py outputs/finetune_compare     (what `make finetune-compare` runs last)

Reads what `make finetune-compare` wrote under the folder: the fine-tuning sidecars
``seed<k>/<method>/<base>/<category>.json`` (the selected step's proxy image/pixel AUROC; step 0's are
the ImageNet weights' proxy scores) and PatchCore's ``patchcore/**/results.json`` (test image/pixel
AUROC; the fine-tuned runs name their seed ``finetune_seed``). Prints a Markdown table: mean ± std
over the fine-tuning seeds (population std; one seed shows no ±), and the selected steps.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METHODS = ("imagenet", "rotation", "cutmix_contrastive")


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}"


def collect(root: Path) -> dict:
    """(category, method) -> {"proxy_image": [...], "proxy_pixel": [...], "test_image": [...], ...}."""
    table: dict = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.glob("seed*/*/*/*.json")):
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
    for path in sorted(root.glob("patchcore/**/results.json")):
        results = json.loads(path.read_text())
        backbone = results.get("config", {}).get("backbone", {})
        method = backbone.get("method") or "imagenet"
        for category, entry in results.get("categories", {}).items():
            table[(category, method)]["test_image"].append(entry.get("image_auroc"))
            table[(category, method)]["test_pixel"].append(entry.get("pixel_auroc"))
    return table


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
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    root = Path(argv[0] if argv else "outputs/finetune_compare")
    if not root.is_dir():
        raise SystemExit(f"error: {root} does not exist: run `make finetune-compare` first")
    print(markdown(collect(root)))


if __name__ == "__main__":
    main(sys.argv[1:])
