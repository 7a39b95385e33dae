"""Tabulate ImageNet vs each fine-tuning method: proxy scores next to test scores, per category.

    python experiments/finetune_compare.py outputs/finetune_compare     (what `make finetune-compare` runs last)
    python experiments/finetune_compare.py studies/default              (the study's fine-tuned arms)
    python experiments/finetune_compare.py --sweep multirun/finetune/...  (a `make sweep-finetune` run: each job)

A view of the report's tables: the runs as the report reads them (reporting/comparisons.py ``load``): a
study's fine-tuned arms by name and their baseline as ``imagenet``, else one arm per fine-tuned method; test AUROCs
from results.json, proxy AUROCs from each checkpoint's sidecar (the selected step; ``imagenet``: step 0 of each
fine-tuning, once per category and training seed), each cell the report's statistic (%, mean ± sample std over
seeds, ddof=1), and the test image-AUROC difference to ImageNet per category with the report's interval and verdict
(stats.paired: the bootstrap over test images and seeds where scores.csv allows), rendered by the report's Markdown
renderer; then the paper's proxy-vs-test agreement table (reporting/finetune_evidence.py: gains over step 0 of the
same fine-tuning and over ImageNet at the same seed), so both print the same counts. ``--sweep``: one row per job
(its ``method.*`` overrides): the selected step's proxy scores and monitors, and the last evaluation's.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.reporting.comparisons import Arm, Comparison, load
from experiments.reporting.data import Run, read_sidecar, sidecars
from experiments.reporting.document import Cell, TableBlock
from experiments.reporting.finetune_evidence import agreement_table
from experiments.reporting.markdown_out import table as markdown_table
from experiments.reporting.stats import SPREAD, cell_stats, interval, mean_std, paired, verdict
from experiments.reporting.tables import VERDICT_RULE, stat_cell, sweep_table
from extensions.checkpoint import is_finetuned

IMAGENET = "imagenet"  # the arm of the runs on the pretrained weights (and of step 0 of every fine-tuning)
PROXY, TEST, DIGITS = ("proxy_image", "proxy_pixel"), ("image_auroc", "pixel_auroc"), 2  # digits in %


@dataclass(frozen=True)
class Collected:
    """What the view prints: the test rows (the report's tidy rows with their ``arm``), the proxy rows (one per
    finished sidecar, plus step 0 as ``imagenet``) and the comparisons the agreement table reads."""

    tests: pd.DataFrame
    proxies: pd.DataFrame
    comparisons: list[Comparison]


def arms_of(root: Path) -> tuple[dict[str, list[Run]], pd.DataFrame, list[Comparison]]:
    """(arm -> its runs, the report's tidy rows, the comparisons with fine-tuned arms) of a study or of a
    `make finetune-compare` folder (one comparison of its own: ImageNet, then each method)."""
    inputs, found, seen = load([root]), {}, set()
    tuned_comparisons = []
    for comparison in inputs.present if inputs.manifest else []:
        tuned = [arm for arm in comparison.others if is_finetuned(arm.runs[0].config.get("backbone") or {})]
        tuned_comparisons += [comparison] if tuned else []
        for name, arm in ([(IMAGENET, comparison.baseline)] if tuned else []) + [(a.name, a) for a in tuned]:
            if (comparison.dataset, name) not in seen:  # an arm's first comparison on each dataset of a study
                seen.add((comparison.dataset, name))
                found.setdefault(name, []).extend(arm.runs)
    for run in [] if inputs.manifest else inputs.runs:
        backbone = run.config.get("backbone") or {}
        found.setdefault(str(backbone.get("method")) if is_finetuned(backbone) else IMAGENET, []).append(run)
    if not inputs.manifest and IMAGENET in found and len(found) > 1:
        arms = [Arm.of(name, found[name], inputs.frame) for name in [IMAGENET, *sorted(set(found) - {IMAGENET})]]
        tuned_comparisons = [Comparison("finetune_compare", "Fine-tuned backbones against ImageNet weights", arms,
                                        dataset=inputs.dataset)]
    return found, inputs.frame, tuned_comparisons


def _training_seed(record: dict, path: str) -> object:
    """What makes two fine-tunings' step 0 the same evaluation: their training seed (it draws the training subset
    of a ``train_limit`` dataset, hence the proxy's held-out images), else the sidecar itself."""
    seed = ((record.get("config") or {}).get("train") or {}).get("seed")
    return path if seed is None else seed


def collect(root: Path) -> Collected:
    """The test rows, the proxy rows and the agreement's comparisons of a finetune-compare or study folder."""
    (arms, frame, comparisons), proxies, started = arms_of(root), [], set()
    for name, runs in arms.items():
        for category, path in (pair for run in runs for pair in sidecars(run)):
            record = read_sidecar(path)
            if record is None:
                continue
            points = [(name, record["selection"]["proxy"], f"{record['selected_step']}/{record['steps']}")]
            start = (category, _training_seed(record, str(path)))
            if start not in started:  # step 0: the pretrained network, once per category and training seed
                started.add(start)
                points.append((IMAGENET, record["selection"]["start"], None))
            proxies += [{"category": category, "arm": arm_name, "proxy_image": point["image_auroc"],
                         "proxy_pixel": point["pixel_auroc"], "proxy_score": point.get("score"), "steps": steps,
                         "sidecar": str(path)} for arm_name, point, steps in points]
    tests = [frame[frame["run_dir"].isin({str(run.folder) for run in runs})].assign(arm=name)
             for name, runs in arms.items()]
    return Collected(pd.concat([t for t in tests if len(t)] or [pd.DataFrame()], ignore_index=True),
                     pd.DataFrame(proxies, columns=["category", "arm", *PROXY, "proxy_score", "steps", "sidecar"]),
                     comparisons)


def table(tests: pd.DataFrame, proxies: pd.DataFrame) -> TableBlock:
    """Category x method (``imagenet`` first): proxy and test AUROCs (the report's cells) and the selected steps."""
    found = set(tests.get("arm", [])) | set(proxies["arm"])
    arms = [IMAGENET, *sorted(found - {IMAGENET})] if IMAGENET in found else sorted(found)
    categories, rows = sorted(set(tests.get("category", [])) | set(proxies["category"])), []
    for category, arm in itertools.product(categories, arms):
        test, proxy = (f[(f["category"] == category) & (f["arm"] == arm)] if len(f) else f for f in (tests, proxies))
        if len(test) or len(proxy):
            cells = [stat_cell(*mean_std(100 * proxy[c].astype(float)), sorted(set(proxy["sidecar"])), DIGITS)
                     for c in PROXY]
            cells += [stat_cell(*cell_stats(test, m, category, categories), DIGITS) if len(test) else Cell("-")
                      for m in TEST]
            rows.append([Cell(category), Cell(arm), *cells, *difference(tests, arm, category),
                         Cell(", ".join(proxy["steps"].dropna()) or "-")])
    header = ["category", "backbone", "proxy image AUROC", "proxy pixel AUROC", "test image AUROC",
              "test pixel AUROC", "Δ test image AUROC [95%]", "verdict", "selected step / steps run"]
    hows = {d["how"] for arm in arms if arm != IMAGENET for c in categories
            if (d := _paired(tests, arm, c)) is not None}
    return TableBlock("finetune_compare", f"Fine-tuned backbones against ImageNet weights: AUROC in % ({SPREAD}); "
                      "proxy: the sidecars' selected step (imagenet: step 0 of each fine-tuning, once per training "
                      "seed); test: PatchCore's results.json. Δ: fine-tuned - ImageNet "
                      f"test image AUROC in points, 95% interval ({'; '.join(sorted(hows)) or 'none'}); "
                      f"{VERDICT_RULE}.", header, rows)


def _paired(tests: pd.DataFrame, arm: str, category: str) -> dict | None:
    if arm == IMAGENET or not len(tests):
        return None
    return paired(tests[tests["arm"] == IMAGENET], tests[tests["arm"] == arm], "image_auroc", [category])


def difference(tests: pd.DataFrame, arm: str, category: str) -> list[Cell]:
    """The test image-AUROC difference of ``arm`` to ImageNet in ``category`` (stats.paired, as the report
    states it) and its verdict."""
    diff = _paired(tests, arm, category)
    return [Cell("-"), Cell("-")] if diff is None else [Cell(interval(diff), diff["mean"]), Cell(verdict(diff))]


def markdown(collected: Collected) -> str:
    """The table, then the paper's proxy-vs-test agreement table of the same runs (when fine-tuned arms have
    sidecars and test results)."""
    text = markdown_table(table(collected.tests, collected.proxies))
    agreement = agreement_table(collected.comparisons)
    return text if agreement is None else text + "\n" + markdown_table(agreement)


def main(argv: list[str]) -> None:
    root = Path(argv[0] if argv else "outputs/finetune_compare")
    if argv[:1] == ["--sweep"]:
        folders = [Path(a) for a in argv[1:]]
        if not folders or not all(f.is_dir() for f in folders):
            raise SystemExit(f"error: give the sweep folders of `make sweep-finetune` runs (missing: "
                             f"{[str(f) for f in folders if not f.is_dir()]})")
        print(markdown_table(sweep_table(folders)))
    elif not root.is_dir():
        raise SystemExit(f"error: {root} does not exist: run `make finetune-compare` (or `make study`) first")
    else:
        print(markdown(collect(root)))


if __name__ == "__main__":
    main(sys.argv[1:])
