"""Label-free configuration selection (the work of ``experiments/selection.py``; docs/selection.md).

Per category, from ``train/good`` only: a seeded part is held out (extensions/proxy.py ``split_holdout``),
the candidate configurations of the space (conf/select/space/, selection_space.py) are fitted on the rest, and
scored on the held-out nominal images and the synthetic anomalies made from them (selection_scoring.py: the
proxy of fine-tuning's checkpoint selection). Successive halving (selection_halving.py, ``select.halving``)
fits every candidate on a seeded subset first and only the best on more, the last rung on the whole training
part; ``select.halving=null`` fits every candidate on the whole part. The best ``select.metric`` of the last
rung wins (ties: the earlier candidate, the run's own configuration first). A candidate is the main.py config
composed from the run's overrides plus its own, so what ``main.py selection=...`` runs is exactly what was
scored. A backbone option whose weights are not on this machine is skipped with its reason, before any fit.
Test images are never read. Every score is written to selection.json at once (``complete: false`` until the
end), keyed by config, category, proxy and training subset: a re-run in the same folder takes them over
instead of fitting them again."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.io import read_record_text, write_json_atomic
from experiments.harness.backbones import backbone_problem, per_category_backbones
from experiments.harness.components import build
from experiments.harness.run_key import config_hash
from experiments.harness.selection_file import FORMAT, VERSION
from experiments.harness.selection_halving import Halving, planned, rung_sizes, survivors
from experiments.harness.selection_scoring import proxy_record, proxy_score, proxy_settings, score_key
from experiments.harness.selection_space import (
    BASE,
    Candidate,
    backbone_options,
    candidates,
    check_base,
    main_overrides,
    with_base,
)
from extensions.checkpoint import is_finetuned
from extensions.proxy import split_holdout

log = logging.getLogger("select")

Compose = Callable[[list[str]], DictConfig]  # main.py overrides -> main.py's composed config
SELECTION_FILE = "selection.json"
SCORE_RUN_FILE = "score_run.json"
ENTRY_KEYS = ("name", "overrides", "config_hash", "rung", "rungs", "resumed")  # a candidate's, not a rung's


def _previous(path: Path) -> dict[str, dict]:
    """Scores of an earlier (interrupted or finished) run in this folder, by key: every rung of every candidate
    (an entry without ``rungs`` is one whole-part score)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(read_record_text(path))
    except (OSError, ValueError):
        log.warning("%s cannot be read: scoring every candidate again", path)
        return {}
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        return {}
    entries = [entry for cat in (record.get("categories") or {}).values() if isinstance(cat, dict)
               for entry in cat.get("candidates", []) if isinstance(entry, dict)]
    rows = [row for entry in entries for row in (entry.get("rungs") or [entry]) if isinstance(row, dict)]
    return {row["key"]: {k: v for k, v in row.items() if k not in ENTRY_KEYS} for row in rows
            if isinstance(row.get("key"), str) and row.get("score", 0) is not None}


def command(chosen: Sequence[str], path: Path, category: str) -> str:
    """The main.py command that runs the chosen configuration."""
    del chosen  # the selection file holds them; the command stays short and cannot drift from the file
    return f"python experiments/main.py selection={path} category={category}"


class _Selection:
    """One select run: its record (written after every fit), the scores it may take over, the progress bar."""

    def __init__(self, cfg: DictConfig, run_dir: Path, base: list[str], space_name: str,
                 halving: Halving | None) -> None:
        self.proxy, self.halving, self.started = proxy_settings(cfg.select), halving, time.perf_counter()
        self.path, self.cache = run_dir / SELECTION_FILE, run_dir / "feature_cache"
        self.done = _previous(self.path)
        self.record = {"format": FORMAT, "version": VERSION, "complete": False, "dataset": str(cfg.dataset.name),
                       "space": space_name, "base_overrides": base, "metric": self.proxy.metric,
                       "proxy": proxy_record(self.proxy), "halving": halving.record() if halving else None,
                       "seed": int(cfg.seed), "planned_fit_images": 0, "categories": {}, "chosen": {},
                       "commands": {}, "time_s": None}
        self.bar = tqdm(total=0, desc="select", unit="img", disable=not cfg.progress)  # ETA: tqdm's time left

    def write(self) -> None:
        self.record["time_s"] = round(time.perf_counter() - self.started, 3)
        write_json_atomic(self.path, self.record)  # a kill loses at most the candidate being fitted

    def score(self, category: str, name: str, config: DictConfig, size: int | None) -> tuple[dict, bool]:
        """(the rung's row, whether it was taken over from the earlier run)."""
        key = score_key(config, category, self.proxy, size)
        if key in self.done:
            return {"key": key, **self.done[key]}, True
        self.bar.set_postfix_str(f"{category} {name}"[:60])
        row = {"key": key, **proxy_score(config, category, self.proxy, self.cache, size)}
        log.info("[%s] %s on %d images: proxy %s %.4f (image %.4f, pixel %.4f)", category, name, row["n_fit"],
                 self.proxy.metric, row["score"] or float("nan"), row["image_auroc"] or float("nan"),
                 row["pixel_auroc"] or float("nan"))
        return row, False

    def replan(self, rung: dict, candidates: int) -> None:
        """The next rung's plan (made with the base carried) when fewer go on: the time-left total follows."""
        spare = (rung["candidates"] - candidates) * rung["n_fit"]
        rung["candidates"] = candidates
        self.record["planned_fit_images"] -= spare
        self.bar.total -= spare
        self.bar.refresh()

    def category(self, category: str, found: list[tuple[Candidate, list[str], DictConfig]], n_full: int,
                 node: dict) -> None:
        """Successive halving (or the plain grid) over the category's candidates; the winner into ``node``."""
        sizes = rung_sizes(len(found), n_full, self.halving)
        eta = self.halving.eta if self.halving else 1
        entries: dict[int, dict] = {}
        alive = list(range(len(found)))
        for rung, size in enumerate(sizes):
            for i in alive:
                candidate, overrides, config = found[i]
                row, resumed = self.score(category, candidate.name, config, size)
                old = entries.get(i)
                rows = [*(old["rungs"] if old else []), row]
                entry = {"name": candidate.name, "overrides": candidate.overrides, "config_hash": config_hash(config),
                         "rung": rung, "rungs": rows, **row}
                if resumed or (old and old.get("resumed")):
                    entry["resumed"] = True
                if old is None:
                    node["candidates"].append(entry)
                else:
                    node["candidates"][node["candidates"].index(old)] = entry
                entries[i] = entry
                self.bar.update(row["n_fit"])
                self.write()
            if rung < len(sizes) - 1:
                base = next((i for i in alive if found[i][0].name == BASE), None)
                alive = survivors(alive, {i: entries[i]["score"] for i in alive}, eta, keep=base)
                log.info("[%s] rung %d: %s go on", category, rung, ", ".join(found[i][0].name for i in alive))
                self.replan(node["rungs"][rung + 1], len(alive))
        last = [i for i in alive if entries[i]["rung"] == len(sizes) - 1 and entries[i]["score"] is not None]
        if not last:
            raise ValueError(f"[{category}] no candidate could be scored (every proxy score was not finite)")
        best = max(last, key=lambda i: entries[i]["score"])  # max keeps the first (earlier) of equal scores
        node["chosen"] = entries[best]["name"]
        self.record["chosen"][category] = found[best][1]
        self.record["commands"][category] = command(self.record["chosen"][category], self.path, category)


def run_selection(cfg: DictConfig, run_dir: Path, task: Sequence[str], compose: Compose,
                  space_name: str = "default") -> dict:
    """Score the candidates for every category, by successive halving or the plain grid (resuming from
    ``run_dir/selection.json``); choose; record. Everything that can fail before a fit fails first."""
    node = cfg.select.get("halving")
    halving = Halving.from_node(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
    run = _Selection(cfg, run_dir, main_overrides(task), space_name, halving)
    base, proxy = run.record["base_overrides"], run.proxy
    space = OmegaConf.to_container(cfg.select.space, resolve=False)  # ${category} stays for main.py
    layout = build(cfg.dataset)
    categories = layout.resolve_categories(cfg.category)
    per_category_backbones(cfg, categories)  # the command's own fine-tuned checkpoints: all there, or said now
    options = {option: compose(with_base(base, Candidate("", list(option), option)))
               for option in backbone_options(space) if option}
    layer_keys = {(): None if is_finetuned(cfg.backbone) else str(cfg.backbone.name),
                  **{o: None if is_finetuned(c.backbone) else str(c.backbone.name) for o, c in options.items()}}
    found = candidates(space, layer_keys)
    check_base(base, found)
    configs = [(c, with_base(base, c), compose(with_base(base, c))) for c in found]
    plans, problems = {}, {}
    for category in categories:  # too few images to hold some out, missing weights: said before any fit
        train, _ = split_holdout(layout.train_samples(category, seed=int(cfg.seed)), proxy.holdout, proxy.seed,
                                 proxy.max_holdout)
        for option, config in options.items():  # a fine-tuned backbone: its checkpoint per category
            where = (option, category if is_finetuned(config.backbone) else None)
            if where not in problems:
                problems[where] = backbone_problem(OmegaConf.merge(config, {"category": category}).backbone)
        skipped = {o: why for o, c in options.items()
                   if (why := problems[(o, category if is_finetuned(c.backbone) else None)])}
        for option, why in skipped.items():
            log.warning("[%s] skipped backbone option %s: %s", category, " ".join(option), why)
        unique, keys = [], set()
        for candidate, overrides, config in configs:  # candidates composing the same config: scored once
            key = score_key(config, category, proxy)
            if candidate.backbone not in skipped and key not in keys:
                unique.append((candidate, overrides, config))
                keys.add(key)
        rungs = planned(len(unique), rung_sizes(len(unique), len(train), halving), len(train),
                        halving.eta if halving else 1, keep=any(c.name == BASE for c, _, _ in unique))
        run.record["planned_fit_images"] += sum(r["candidates"] * r["n_fit"] for r in rungs)
        run.record["categories"][category] = {
            "candidates": [], "chosen": None, "rungs": rungs,
            "skipped": [{"name": f"backbone:{' '.join(o)}", "reason": why} for o, why in skipped.items()]}
        plans[category] = (unique, len(train))
    run.bar.total = run.record["planned_fit_images"]
    for category, (unique, n_full) in plans.items():
        run.category(category, unique, n_full, run.record["categories"][category])
    run.bar.close()
    run.record["complete"] = True
    run.write()
    return run.record


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
