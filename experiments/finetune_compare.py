"""Tabulate ImageNet vs each fine-tuning method: proxy scores next to test scores, per category.

    python experiments/finetune_compare.py outputs/finetune_compare     (what `make finetune-compare` runs last)
    python experiments/finetune_compare.py studies/default              (the study's fine-tuned arms)
    python experiments/finetune_compare.py --sweep multirun/finetune/...  (a `make sweep-finetune` run: each job)

A view of the report's tables: the runs as the report reads them (reporting/comparisons.py ``load``): a
study's fine-tuned arms by name and their baseline as ``imagenet``, else one arm per fine-tuned method; test AUROCs
from results.json, proxy AUROCs from each checkpoint's sidecar (the selected step; step 0: the ImageNet weights'),
each cell the report's statistic (%, mean ± sample std over seeds, ddof=1), and the test image-AUROC difference
to ImageNet per category with the report's interval and verdict (stats.paired: the bootstrap over test images and
seeds where scores.csv allows), rendered by the report's Markdown renderer; then how often the proxy's change
agreed in sign with the test's. ``--sweep``: one row per job (its ``method.*`` overrides): the selected step's
proxy scores and monitors, and the last evaluation's.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pandas as pd

from experiments.reporting.comparisons import load
from experiments.reporting.data import Run, read_sidecar, sidecars
from experiments.reporting.document import Cell, TableBlock
from experiments.reporting.finetune_evidence import same_sign
from experiments.reporting.markdown_out import table as markdown_table
from experiments.reporting.stats import SPREAD, cell_stats, interval, mean_std, paired, verdict
from experiments.reporting.tables import VERDICT_RULE, stat_cell, sweep_table
from extensions.checkpoint import is_finetuned

IMAGENET = "imagenet"  # the arm of the runs on the pretrained weights (and of step 0 of every fine-tuning)
PROXY, TEST, DIGITS = ("proxy_image", "proxy_pixel"), ("image_auroc", "pixel_auroc"), 2  # digits in %


def arms_of(root: Path) -> tuple[dict[str, list[Run]], pd.DataFrame]:
    """(arm -> its runs, the report's tidy rows) of a study or of a `make finetune-compare` folder."""
    inputs, found, seen = load([root]), {}, set()
    for comparison in inputs.comparisons if inputs.manifest else []:
        tuned = [arm for arm in comparison.others if is_finetuned(arm.runs[0].config.get("backbone") or {})]
        for name, arm in ([(IMAGENET, comparison.baseline)] if tuned else []) + [(a.name, a) for a in tuned]:
            if (comparison.dataset, name) not in seen:  # an arm's first comparison on each dataset of a study
                seen.add((comparison.dataset, name))
                found.setdefault(name, []).extend(arm.runs)
    for run in [] if inputs.manifest else inputs.runs:
        backbone = run.config.get("backbone") or {}
        found.setdefault(str(backbone.get("method")) if is_finetuned(backbone) else IMAGENET, []).append(run)
    return found, inputs.frame


def collect(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test rows: the report's tidy rows with their ``arm``, proxy rows: one per finished sidecar, plus step 0
    once per category as ``imagenet``) of a finetune-compare or study folder."""
    (arms, frame), proxies, started = arms_of(root), [], set()
    for name, runs in arms.items():
        for category, path in (pair for run in runs for pair in sidecars(run)):
            record = read_sidecar(path)
            if record is None:
                continue
            points = [(name, record["selection"]["proxy"], f"{record['selected_step']}/{record['steps']}")]
            if category not in started:  # step 0: the same pretrained network for every method and seed
                started.add(category)
                points.append((IMAGENET, record["selection"]["start"], None))
            proxies += [{"category": category, "arm": arm_name, "proxy_image": point["image_auroc"],
                         "proxy_pixel": point["pixel_auroc"], "proxy_score": point.get("score"), "steps": steps,
                         "sidecar": str(path)} for arm_name, point, steps in points]
    tests = [frame[frame["run_dir"].isin({str(run.folder) for run in runs})].assign(arm=name)
             for name, runs in arms.items()]
    return (pd.concat([t for t in tests if len(t)] or [pd.DataFrame()], ignore_index=True),
            pd.DataFrame(proxies, columns=["category", "arm", *PROXY, "proxy_score", "steps", "sidecar"]))


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
                      "proxy: the sidecars' selected step; test: PatchCore's results.json. Δ: fine-tuned - ImageNet "
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


def agreement(tests: pd.DataFrame, proxies: pd.DataFrame, proxy: str = "proxy_image") -> tuple[int, int]:
    """(agreeing, compared): fine-tuned (category, method) cells whose mean proxy change over step 0 (``proxy``:
    proxy_image, or proxy_score: what selection maximised) and mean test image-AUROC change over ImageNet have
    the same sign (both zero counts as agreeing; AUROCs differing below 1e-9 are equal)."""
    means = pd.concat([proxies.groupby(["category", "arm"])[proxy].mean(),
                       tests.groupby(["category", "arm"])["image_auroc"].mean()], axis=1)
    changes = [(row - means.loc[(category, IMAGENET)]).to_numpy() for (category, arm), row in means.iterrows()
               if arm != IMAGENET and (category, IMAGENET) in means.index]
    pairs = [(float(d[0]), float(d[1])) for d in changes if not pd.isna(d).any()]
    return same_sign(pairs), len(pairs)


def markdown(tests: pd.DataFrame, proxies: pd.DataFrame) -> str:
    (agreeing, compared), (by_score, scored) = agreement(tests, proxies), agreement(tests, proxies, "proxy_score")
    if not compared:
        return markdown_table(table(tests, proxies))
    by_score = f"; the selection score's change (what selection maximised) in {by_score} of {scored}" if scored else ""
    return (markdown_table(table(tests, proxies)) + "\nThe proxy's image-AUROC change (selected step vs step 0) and "
            f"the test's (fine-tuned vs ImageNet) have the same sign in {agreeing} of {compared} category x method "
            f"cells{by_score}.")


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
        print(markdown(*collect(root)))


if __name__ == "__main__":
    main(sys.argv[1:])
