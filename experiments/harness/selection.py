"""Label-free configuration selection (the work of ``experiments/selection.py``; docs/selection.md).

Per category, from ``train/good`` only: a seeded part is held out (extensions/proxy.py ``split_holdout``),
each candidate configuration of the space (conf/select/space/) is fitted on the rest, and scored on the
held-out nominal images and the synthetic anomalies made from them (extensions/proxy.py ``ProxySet``: the
same proxy as fine-tuning's checkpoint selection). The best ``select.metric`` wins (ties: the earlier
candidate, the run's own configuration first). A candidate is the main.py config composed from the run's
overrides plus its own, so what ``main.py selection=...`` runs is exactly what was scored. Test images are
never read. Every scored candidate is written to selection.json at once (``complete: false`` until the end):
a re-run in the same folder takes them over instead of fitting them again. A plain grid for now: every
candidate is fitted on the whole training part (no successive halving yet).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.io import read_record_text, write_json_atomic
from experiments.harness.components import build
from experiments.harness.overrides import renamed_overrides
from experiments.harness.run_key import config_hash
from experiments.harness.selection_file import FORMAT, VERSION, check_override
from experiments.harness.selection_scoring import proxy_record, proxy_score, proxy_settings, score_key
from extensions.proxy import split_holdout

log = logging.getLogger("select")

Compose = Callable[[list[str]], DictConfig]  # main.py overrides -> main.py's composed config
SELECTION_FILE = "selection.json"
SCORE_RUN_FILE = "score_run.json"
OWN_KEYS = ("select.", "select/", "score_run", "hydra.", "category")  # selection.py's own keys, not main.py's


def main_overrides(task: Sequence[str]) -> list[str]:
    """The select command's overrides that are main.py's (the base every candidate starts from)."""
    return [o for o in task if not any(o.lstrip("+~").startswith(k) for k in OWN_KEYS)]


def candidates(space: Mapping, backbone: str) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every candidate of the space (conf/select/space/default.yaml says the format)."""
    axes = {name: [list(option) for option in options] for name, options in (space.get("axes") or {}).items()}
    layers = (space.get("layers") or {}).get(backbone)
    if layers:
        axes["layers"] = [list(option) for option in layers]
    combine = space.get("combine", "one_at_a_time")
    if combine == "one_at_a_time":
        found = [("base", [])] + [(f"{axis}:{' '.join(o)}", o) for axis, options in axes.items() for o in options]
    elif combine == "grid":
        found = [(" ".join(o for part in combo for o in part) or "base", [o for part in combo for o in part])
                 for combo in itertools.product(*(options or [[]] for options in axes.values()))]
    else:
        raise ValueError(f"select/space combine={combine!r}: choose one_at_a_time or grid")
    for name, overrides in found:
        for override in overrides:
            check_override(override, f"select/space candidate {name!r}")
    return found


def check_base(base: Sequence[str], found: Sequence[tuple[str, list[str]]]) -> None:
    """The command may not set a key the space varies (which one would win is ambiguous): named now."""
    if problems := renamed_overrides(base):
        raise ValueError("; ".join(problems))
    varied = {o.split("=", 1)[0] for _, overrides in found for o in overrides}
    clash = sorted(varied & {o.split("=", 1)[0].lstrip("+~") for o in base})
    if clash:
        raise ValueError(f"{', '.join(clash)} is varied by the candidate space: drop it from the command, or "
                         "choose a space without it (select/space=<name>, conf/select/space/)")


def _previous(path: Path) -> dict[str, dict]:
    """Scored candidates of an earlier (interrupted or finished) run in this folder, by key."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(read_record_text(path))
    except (OSError, ValueError):
        log.warning("%s cannot be read: scoring every candidate again", path)
        return {}
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        return {}
    return {entry["key"]: entry for cat in (record.get("categories") or {}).values()
            for entry in cat.get("candidates", []) if isinstance(entry, dict) and entry.get("score", 0) is not None
            and "key" in entry}


def command(chosen: Sequence[str], path: Path, category: str) -> str:
    """The main.py command that runs the chosen configuration."""
    del chosen  # the selection file holds them; the command stays short and cannot drift from the file
    return f"python experiments/main.py selection={path} category={category}"


def run_selection(cfg: DictConfig, run_dir: Path, task: Sequence[str], compose: Compose,
                  space_name: str = "default") -> dict:
    """Score every candidate for every category (resuming from ``run_dir/selection.json``); choose; record."""
    started = time.perf_counter()
    proxy = proxy_settings(cfg.select)
    base = main_overrides(task)
    found = candidates(OmegaConf.to_container(cfg.select.space, resolve=True), str(cfg.backbone.name))
    check_base(base, found)
    layout = build(cfg.dataset)
    categories = layout.resolve_categories(cfg.category)
    path = run_dir / SELECTION_FILE
    done = _previous(path)
    configs = [(name, overrides, compose([*base, *overrides])) for name, overrides in found]
    for category in categories:  # too few images to hold some out: said before any fit
        split_holdout(layout.train_samples(category, seed=int(cfg.seed)), proxy.holdout, proxy.seed,
                      proxy.max_holdout)
    record = {"format": FORMAT, "version": VERSION, "complete": False, "dataset": str(cfg.dataset.name),
              "space": space_name, "base_overrides": base, "metric": proxy.metric,
              "proxy": proxy_record(proxy),
              "seed": int(cfg.seed), "categories": {}, "chosen": {}, "commands": {}, "time_s": None}
    jobs = [(category, name, overrides, candidate) for category in categories
            for name, overrides, candidate in configs]
    bar = tqdm(jobs, desc="select", unit="fit", disable=not cfg.progress)  # ETA: tqdm's time left
    for category, name, overrides, candidate in bar:
        bar.set_postfix_str(f"{category} {name}"[:60])
        key = score_key(candidate, category, proxy)
        entries = record["categories"].setdefault(category, {"candidates": [], "chosen": None})["candidates"]
        if any(entry["key"] == key for entry in entries):  # equal to an earlier candidate: scored once
            continue
        if key in done:
            entry = {**done[key], "name": name, "overrides": overrides, "resumed": True}
        else:
            entry = {"name": name, "overrides": overrides, "key": key, "config_hash": config_hash(candidate),
                     **proxy_score(candidate, category, proxy, run_dir / "feature_cache")}
            log.info("[%s] %s: proxy %s %.4f (image %.4f, pixel %.4f)", category, name, proxy.metric,
                     entry["score"] or float("nan"), entry["image_auroc"] or float("nan"),
                     entry["pixel_auroc"] or float("nan"))
        entries.append(entry)
        record["time_s"] = round(time.perf_counter() - started, 3)
        write_json_atomic(path, record)  # a kill loses at most the candidate being fitted
    for category, node in record["categories"].items():
        scored = [e for e in node["candidates"] if e.get("score") is not None]
        if not scored:
            raise ValueError(f"[{category}] no candidate could be scored (every proxy score was not finite)")
        best = max(scored, key=lambda e: e["score"])  # max keeps the first of equal scores
        node["chosen"] = best["name"]
        record["chosen"][category] = [*base, *best["overrides"]]
        record["commands"][category] = command(record["chosen"][category], path, category)
    record["complete"], record["time_s"] = True, round(time.perf_counter() - started, 3)
    write_json_atomic(path, record)
    return record


def run_overrides(run: Path) -> list[str]:
    """A finished main.py run's command-line overrides (.hydra/overrides.yaml), checked: only main.py keys,
    no ``_target_`` (the classes come from conf/, never from a file on disk)."""
    file = run / ".hydra" / "overrides.yaml"
    if not (run / "results.json").is_file() or not file.is_file():
        raise ValueError(f"score_run={run}: not a main.py run folder (it needs results.json and "
                         ".hydra/overrides.yaml)")
    overrides = OmegaConf.create(read_record_text(file))
    if not OmegaConf.is_list(overrides) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"score_run={run}: {file} is not a list of overrides")
    bad = [o for o in overrides if "_target_" in o.split("=", 1)[0] or o.startswith("hydra")]
    if bad:
        raise ValueError(f"score_run={run}: {file} sets {bad}, which a scored run may not set")
    return [o for o in overrides if not o.startswith("selection=")]


def score_run(cfg: DictConfig, run: Path, run_dir: Path, compose: Compose) -> dict:
    """Score a finished main.py run's configuration with the proxy, per category; written to
    ``run_dir/score_run.json`` (the finished run is only read)."""
    started = time.perf_counter()
    proxy = proxy_settings(cfg.select)
    results = json.loads(read_record_text(run / "results.json")) if (run / "results.json").is_file() else {}
    run_cfg = compose(run_overrides(run))
    recorded = results.get("config_hash")
    if recorded and recorded != config_hash(run_cfg):
        raise ValueError(f"score_run={run}: its overrides compose a config (hash {config_hash(run_cfg)}) that is "
                         f"not the one it ran (hash {recorded}): conf/ changed since; score it from that commit")
    categories = sorted(results.get("categories") or {}) or build(run_cfg.dataset).resolve_categories(
        run_cfg.category)
    record = {"run": str(run), "config_hash": config_hash(run_cfg), "metric": proxy.metric,
              "proxy": proxy_record(proxy), "categories": {}}
    for category in tqdm(categories, desc="score_run", disable=not cfg.progress):
        record["categories"][category] = proxy_score(run_cfg, category, proxy, run_dir / "feature_cache")
    scores = [c["score"] for c in record["categories"].values() if c.get("score") is not None]
    record["mean_score"] = sum(scores) / len(scores) if scores else None
    record["time_s"] = round(time.perf_counter() - started, 3)
    write_json_atomic(run_dir / SCORE_RUN_FILE, record)
    return record
