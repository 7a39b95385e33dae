"""Tabulate ImageNet vs each fine-tuning method: proxy scores next to test scores, per category.

    python experiments/finetune_compare.py outputs/finetune_compare     (what `make finetune-compare` runs last)
    python experiments/finetune_compare.py studies/default              (the study's fine-tuned arms)
    python experiments/finetune_compare.py --sweep multirun/finetune/...  (a `make sweep-finetune` run: each job)

Reads the fine-tuning sidecars ``seed<k>/<method>/<base>/<category>.json`` (the selected step's proxy
image/pixel AUROC; step 0's are the ImageNet weights' proxy scores) and PatchCore's ``results.json`` (test
image/pixel AUROC); each run's sidecars lie next to its checkpoints (``backbone.checkpoint``). In a `make
finetune-compare` folder the runs are ``patchcore/**``, one row per method (a run's method: its fine-tuned
backbone's, ``extensions.checkpoint.is_finetuned``; otherwise ``imagenet``); in a study folder (it holds
``study.json``) the arms are the study's, as the report reads them (every comparison with a fine-tuned arm:
its baseline as ``imagenet`` and each fine-tuned arm by name). No method list: the rows are what the runs
hold. It is a view of the report's tables: the runs are read into the report's tidy rows, every cell is the report's
statistic (experiments/reporting/stats.py: in %, mean ± sample std over seeds, ddof=1; one seed shows no ±)
and the table is a document-model table rendered by the report's Markdown renderer. Then how often the
proxy's change agreed in sign with the test's. With ``--sweep``, one row per job of fine-tuning multiruns
(``<sweep dir>/<job>/checkpoints/...``, the job's ``method.*`` overrides from ``.hydra/overrides.yaml``): the
selected step's proxy scores and monitors, and the last evaluation's (what training gave without the
selection, from the proxy log).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from experiments.harness.run_key import read_results, results_hash
from experiments.reporting.comparisons import Arm, load
from experiments.reporting.data import Run, tidy
from experiments.reporting.document import Cell, TableBlock
from experiments.reporting.markdown_out import table as markdown_table
from experiments.reporting.stats import SPREAD, cell_stats, mean_std, number
from extensions.checkpoint import is_finetuned

IMAGENET = "imagenet"  # the arm of the runs on the pretrained weights (and of step 0 of every fine-tuning)
PROXY = ("proxy_image", "proxy_pixel")
TEST = ("image_auroc", "pixel_auroc")
DIGITS = 2  # in %: the resolution of the earlier 4-decimal fractions


def _sign(x: float) -> int:
    return int(x > 1e-9) - int(x < -1e-9)  # AUROCs differing below 1e-9 are equal


def _number(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def method_of(run: Run) -> str:
    backbone = run.config.get("backbone") or {}
    return str(backbone.get("method")) if is_finetuned(backbone) else IMAGENET


def arms_of(root: Path) -> list[tuple[str, list[Run], pd.DataFrame]]:
    """(arm, its runs, their tidy rows). In a study (it holds study.json) the report's comparisons
    (comparisons.load): the baseline as ``imagenet`` and every fine-tuned arm, by its name in the study; in a
    `make finetune-compare` folder its complete runs under ``patchcore/``, by method."""
    if (root / "study.json").is_file():
        found: dict[str, Arm] = {}
        for comparison in load([root]).comparisons:
            tuned = [arm for arm in comparison.others if is_finetuned(arm.runs[0].config.get("backbone") or {})]
            for name, arm in ([(IMAGENET, comparison.baseline)] if tuned else []) + [(a.name, a) for a in tuned]:
                found.setdefault(name, arm)
        return [(name, arm.runs, arm.rows) for name, arm in found.items()]
    groups: dict[str, list[Run]] = {}
    for path in sorted(root.glob("patchcore/**/results.json")):
        results = read_results(path)
        if isinstance(results, dict) and results.get("complete") is not False:
            run = Run(path.parent, results, results_hash(results))
            groups.setdefault(method_of(run), []).append(run)
    return [(name, runs, tidy(runs)) for name, runs in groups.items()]


def sidecars_of(run: Run) -> list[Path]:
    """The fine-tuning sidecars of a run's checkpoints, one per category, next to them (docs/finetuning.md)."""
    checkpoint = (run.config.get("backbone") or {}).get("checkpoint")
    categories = sorted(run.results.get("categories") or {}) if checkpoint else []
    return [Path(str(checkpoint)).parent / f"{category}.json" for category in categories]


def proxy_rows(sidecars: list[tuple[str, Path]]) -> pd.DataFrame:
    """One row per (arm, finished sidecar): the selected step's proxy scores, plus step 0 once per category
    (``imagenet``: the same pretrained network for every method and seed)."""
    rows, started = [], set()

    def row(category: str, arm: str, point: dict, steps: str | None, path: Path) -> dict:
        return {"category": category, "arm": arm, "proxy_image": point["image_auroc"],
                "proxy_pixel": point["pixel_auroc"], "proxy_score": point.get("score"), "steps": steps,
                "sidecar": str(path)}

    for arm, path in sidecars:
        record = read_results(path) if path.is_file() else None
        if not isinstance(record, dict) or not record.get("complete") or "selection" not in record:
            continue
        selection, category = record["selection"], record["category"]
        rows.append(row(category, arm, selection["proxy"], f"{record['selected_step']}/{record['steps']}", path))
        if category not in started:
            started.add(category)
            rows.append(row(category, IMAGENET, selection["start"], None, path))
    return pd.DataFrame(rows, columns=["category", "arm", *PROXY, "proxy_score", "steps", "sidecar"])


def collect(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test rows: the report's tidy rows with their ``arm``, proxy rows) of a finetune-compare or study folder."""
    found = arms_of(root)
    tests = pd.concat([rows.assign(arm=name) for name, _, rows in found if len(rows)] or [pd.DataFrame()],
                      ignore_index=True)
    return tests, proxy_rows([(name, path) for name, runs, _ in found for run in runs for path in sidecars_of(run)])


def arms(tests: pd.DataFrame, proxies: pd.DataFrame) -> list[str]:
    """``imagenet`` first, then the methods found, by name."""
    found = set(tests.get("arm", [])) | set(proxies["arm"])
    return [IMAGENET, *sorted(found - {IMAGENET})] if IMAGENET in found else sorted(found)


def _of(frame: pd.DataFrame, category: str, arm: str) -> pd.DataFrame:
    return frame[(frame["category"] == category) & (frame["arm"] == arm)] if len(frame) else frame


def table(tests: pd.DataFrame, proxies: pd.DataFrame) -> TableBlock:
    """Category x method: proxy and test AUROCs (the report's cells and statistic) and the selected steps."""
    rows = []
    categories = sorted(set(tests.get("category", [])) | set(proxies["category"]))
    for category in categories:
        for arm in arms(tests, proxies):
            test, proxy = _of(tests, category, arm), _of(proxies, category, arm)
            if test.empty and proxy.empty:
                continue
            cells = [_proxy_cell(proxy, column) for column in PROXY]
            cells += [_stat_cell(*cell_stats(test, metric, category, categories)) if len(test) else Cell("-")
                      for metric in TEST]
            steps = ", ".join(proxy["steps"].dropna()) or "-"
            rows.append([Cell(category), Cell(arm), *cells, Cell(steps)])
    header = ["category", "backbone", "proxy image AUROC", "proxy pixel AUROC", "test image AUROC",
              "test pixel AUROC", "selected step / steps run"]
    return TableBlock("finetune_compare", f"Fine-tuned backbones against ImageNet weights: AUROC in % ({SPREAD}); "
                      "proxy: the sidecars' selected step; test: PatchCore's results.json.", header, rows)


def _stat_cell(mean: float, std: float, n: int, sources: list[str]) -> Cell:
    return Cell(number(mean, std, n, DIGITS), mean, std=std, sources=sources)


def _proxy_cell(proxy: pd.DataFrame, column: str) -> Cell:
    return _stat_cell(*mean_std(100 * proxy[column].astype(float)), sorted(set(proxy["sidecar"])))


def agreement(tests: pd.DataFrame, proxies: pd.DataFrame, proxy: str = "proxy_image") -> tuple[int, int]:
    """(agreeing, compared): fine-tuned (category, method) cells whose mean proxy change over step 0 (``proxy``:
    proxy_image, or proxy_score: what selection maximised) and mean test image-AUROC change over ImageNet have
    the same sign (both zero counts as agreeing)."""
    means = pd.concat([proxies.groupby(["category", "arm"])[proxy].mean(),
                       tests.groupby(["category", "arm"])["image_auroc"].mean()], axis=1)
    agreeing = compared = 0
    for (category, arm), row in means.iterrows():
        if arm == IMAGENET or (category, IMAGENET) not in means.index:
            continue
        start = means.loc[(category, IMAGENET)]
        if row.isna().any() or start.isna().any():
            continue
        compared += 1
        agreeing += _sign(row[proxy] - start[proxy]) == _sign(row["image_auroc"] - start["image_auroc"])
    return agreeing, compared


def markdown(tests: pd.DataFrame, proxies: pd.DataFrame) -> str:
    lines = [markdown_table(table(tests, proxies))]
    agreeing, compared = agreement(tests, proxies)
    if compared:
        by_score, scored = agreement(tests, proxies, "proxy_score")
        lines.append(f"The proxy's image-AUROC change (selected step vs step 0) and the test's (fine-tuned vs "
                     f"ImageNet) have the same sign in {agreeing} of {compared} category x method cells"
                     + (f"; the selection score's change (what selection maximised) in {by_score} of {scored}."
                        if scored else "."))
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
    print(markdown(*collect(root)))


if __name__ == "__main__":
    main(sys.argv[1:])
