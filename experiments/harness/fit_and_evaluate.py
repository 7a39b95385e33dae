"""Fit a detector on each requested category and evaluate it: the work of ``python experiments/main.py``.

``instantiate(cfg.model)`` builds the detector (PatchCore with its extractor, embedder, sampler,
search, storage and scoring head, or the CAE baseline); this module only runs it category by category
and writes the run record (results.json, scores.csv, maps, saved models) into the Hydra output folder.
Settings are checked, the dataset layout resolved and the model's object graph built (the backbone's
weights loaded) before any image is read, so a bad setting fails in seconds.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from core.backbones import FeatureExtractor
from core.data import AnomalyDataset, DatasetError, MVTecLayout, UnreadableFilesError
from core.detector import Detector
from core.io import remove_dead_temporaries, write_json_atomic
from core.metrics import METRIC_DEFINITIONS
from core.thresholds import ThresholdRule
from experiments.harness.anomaly_maps import MAPS_DIR, save_maps
from experiments.harness.components import build, resolve_device
from experiments.harness.evaluation import (
    apply_threshold,
    evaluate,
    image_metrics_note,
    score_rows,
    split_validation,
    without_types,
)
from experiments.harness.interrupts import Interrupted
from experiments.harness.model_build import ModelBuilder
from experiments.harness.results import (
    SCHEMA_VERSION,
    config_record,
    failure_message,
    format_table,
    git_commit,
    mean_metrics,
    not_computable,
    out_of_memory_message,
    peak_rss_mb,
    read_scores_csv,
    versions,
    write_scores_csv,
)
from experiments.harness.run_key import check_run_dir, claim_run, config_hash, read_results, resumable, skip_if_done
from experiments.harness.run_settings import check_writable, validate
from experiments.harness.tracking import NoLogger, make_tracker

log = logging.getLogger("patchcore")


class Harness:
    """One run: the checked settings, the layout and the model's object graph, built once at start-up
    (which validates every setting, each in the class that uses it) before any image is read."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.settings = validate(cfg)  # every mistyped setting, by name, at once; the run's own ranges
        torch.manual_seed(self.settings.seed)
        np.random.seed(self.settings.seed)
        check_writable(run_dir, "the run folder (hydra.run.dir)")
        self.device = resolve_device(self.settings.device)
        self.layout: MVTecLayout = build(cfg.dataset)
        self.categories = self.layout.resolve_categories(cfg.category)
        self.rule: ThresholdRule | None = build(cfg.threshold) if "_target_" in cfg.threshold else None
        self.builder = ModelBuilder(cfg, self.layout, self.device, self.categories)  # shared with selection
        self._first: Detector | None = self.builder.model(self.categories[0])  # every model setting checked here
        self.extractor: FeatureExtractor | None = self.builder.extractor
        log.info("model %s: %s; dataset %s, categories %s, on %s", cfg.model._target_,
                 f"backbone {self.extractor.name} (layers {self.extractor.layers})" if self.extractor else
                 "no backbone", self.layout.name, self.categories, self.device)
        self.unusable: dict[str, str] = {}  # category -> unreadable files: failed without being fitted
        for category in self.categories:  # layout errors, unreadable images and masks before any model work
            try:
                for problem in self.layout.scan(category, seed=self.settings.seed):
                    log.warning("[%s] skipped (dataset.skip_unreadable=true): %s", category, problem)
                if note := image_metrics_note([s.label for s in self.layout.test_samples(category)]):
                    log.warning("[%s] %s", category, note)  # said now, not after the fit
            except UnreadableFilesError as error:
                log.error("[%s] %s", category, error)
                self.unusable[category] = f"{type(error).__name__}: {error}"
        if len(self.unusable) == len(self.categories):
            raise DatasetError("\n".join(self.unusable.values()))

    def new_model(self, category: str) -> Detector:
        """The model for ``category``: the start-up build for the first one, a fresh build for the others."""
        if self._first is not None:
            model, self._first = self._first, None
            return model
        model = self.builder.model(category)
        self.extractor = self.builder.extractor
        return model

    def loader(self, dataset: AnomalyDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.settings.batch_size, num_workers=self.settings.num_workers,
                          pin_memory=self.device.type == "cuda")

    def run_category(self, category: str) -> tuple[dict, list[dict]]:
        """Fit on the category's nominal images, predict its test set, evaluate, save what was asked."""
        cfg = self.cfg
        model = self.new_model(category)
        preprocessing = self.layout.preprocessing(model.mean, model.std, model.interpolation)
        seed = self.settings.seed
        fit_samples, held_out = split_validation(self.layout.train_samples(category, seed=seed),
                                                 self.rule.validation_fraction if self.rule else 0.0, seed)
        test_loader = self.loader(self.layout.test_set(category, preprocessing))
        log.info("[%s] fitting on %d nominal images (%d held out for the threshold)", category, len(fit_samples),
                 len(held_out))
        fit = model.fit(self.loader(AnomalyDataset(fit_samples, preprocessing)))
        log.info("[%s] fitted: %s", category, ", ".join(f"{k} {v:.1f}s" for k, v in fit.timings_s.items()))
        start = time.perf_counter()
        predictions = model.predict(test_loader)
        predict_s = time.perf_counter() - start
        excluded = self.layout.excluded_from_main_metrics  # e.g. ELPV's uncertain cells: their own AUROCs
        start = time.perf_counter()
        metrics, note = evaluate(predictions, excluded)
        evaluate_s = time.perf_counter() - start
        for warning in (note, metrics["image_metrics_note"]):
            if warning:
                log.warning("[%s] %s", category, warning)
        threshold = None
        if self.rule is not None:
            nominal = model.predict(self.loader(AnomalyDataset(held_out, preprocessing))) if held_out else None
            threshold = apply_threshold(self.rule, nominal, without_types(predictions, excluded))
            if threshold.get("warning"):
                log.warning("[%s] %s", category, threshold["warning"])
            log.info("[%s] %s threshold %.4g%s: precision %s, recall %s, confusion %s", category, self.rule.name,
                     threshold["image_threshold"],
                     " (optimistic: chosen on the test labels)" if self.rule.optimistic else "",
                     threshold["precision"], threshold["recall"], threshold["confusion"])
        n_maps = OmegaConf.select(cfg, "viz.n", default=0) or 0
        if n_maps > 0:  # a few anomaly maps for W&B and the report (format: experiments/harness/anomaly_maps.py)
            save_maps(self.run_dir / MAPS_DIR / category, predictions, test_loader.dataset, preprocessing, n_maps,
                      threshold)
        save = self.settings.save_model  # true: self-contained (weights inside); spec_only: looked up on load
        if save:
            saved = model.save(self.run_dir / "models" / category, weights=save != "spec_only",
                               threshold=threshold,
                               metadata={"category": category, "preprocessing": preprocessing.__dict__,
                                         "threshold": threshold, "config": config_record(cfg)})
            log.info("[%s] model saved to %s", category, saved)
        entry = {**metrics, "n_train": fit.n_images, "n_test": len(predictions.image_scores),
                 "bank_size": fit.bank_size, "pixel_metrics_note": note,
                 "timings_s": {**fit.timings_s, "predict": predict_s, "evaluate": evaluate_s}}
        if threshold is not None:
            entry["threshold"] = threshold
        if self.layout.unreadable.get(category):
            entry["skipped_inputs"] = self.layout.unreadable[category]
        return entry, score_rows(category, predictions)


class _Unusable(Exception):
    """A category the start-up scan found unreadable files in (its message is the failure entry)."""


def run(cfg: DictConfig, run_dir: Path, tracker: NoLogger | None = None) -> dict:
    """Check everything cheap first, then fit and evaluate category by category, saving after each."""
    tracker = tracker or NoLogger()
    started = time.perf_counter()
    check_run_dir(cfg, run_dir)  # never replace another config's results without a word
    for leftover in remove_dead_temporaries(run_dir):  # half-written files of a run that was killed here
        log.info("removed %s, left unfinished by a process that died", leftover)
    harness = Harness(cfg, run_dir)
    results: dict = {"schema_version": SCHEMA_VERSION, "metric_definitions": dict(METRIC_DEFINITIONS),
                     "config": config_record(cfg), "categories": {}, "mean": {}, "not_computable": {},
                     "failed": {}, "complete": False, "peak_rss_mb": None, "total_time_s": None,
                     "versions": versions(), "git_commit": git_commit(), "config_hash": config_hash(cfg),
                     "preprocessing": {"resize": harness.layout.resize, "image_size": harness.layout.image_size}}
    score_table = _resume(cfg, run_dir, harness.categories, results)
    for category in harness.categories:
        if category in results["categories"]:
            continue  # finished by the interrupted run this one resumes
        _run_one(harness, category, results, score_table, run_dir, tracker)
        _finish_record(results, harness, started, run_dir)
    _finish_record(results, harness, started, run_dir)
    return results


def _run_one(harness: Harness, category: str, results: dict, score_table: list[dict], run_dir: Path,
             tracker: NoLogger) -> None:
    """One category into ``results`` (its entry or its failure) and its rows into ``score_table``. Every
    write of the category's outputs sits inside the guard: a full disk fails this category, not the run (the
    tracker guards itself: W&B never breaks a run)."""
    try:
        if category in harness.unusable:  # found by the start-up scan: not fitted
            raise _Unusable(harness.unusable[category])
        entry, rows = harness.run_category(category)
        write_scores_csv(run_dir / "scores.csv", [*score_table, *rows])
    except _Unusable as error:
        results["failed"][category] = str(error)
    except Exception as error:  # keep finished categories; report the failure at the end
        memory = out_of_memory_message(error, harness.settings.batch_size, harness.layout.image_size)
        if memory:  # what to lower says more than a traceback through the backbone
            log.error("[%s] failed: %s", category, memory)
        else:
            log.exception("[%s] failed", category)
        results["failed"][category] = memory or failure_message(error)  # the traceback: in the log only
    else:
        results["categories"][category] = entry
        score_table.extend(rows)
        tracker.log_category(category, entry, rows, sorted((run_dir / MAPS_DIR / category).glob("*.png")))


def _finish_record(results: dict, harness: Harness, started: float, run_dir: Path) -> None:
    """Means, completeness, memory and time, then results.json (atomically: a kill leaves the previous one)."""
    results["mean"] = mean_metrics(results["categories"])
    results["not_computable"] = not_computable(results["categories"])
    results["complete"] = not results["failed"] and len(results["categories"]) == len(harness.categories)
    results["peak_rss_mb"] = peak_rss_mb()
    results["total_time_s"] = time.perf_counter() - started
    write_json_atomic(run_dir / "results.json", results)


def _resume(cfg: DictConfig, run_dir: Path, categories: list[str], results: dict) -> list[dict]:
    """Take over the finished categories of an interrupted run of the same config (a kill, a failed category):
    their entries, score rows, maps and saved models. Returns the score rows taken over."""
    previous_path = resumable(cfg, run_dir)
    previous = read_results(previous_path) if previous_path else None
    if not previous:
        return []
    finished = [name for name in categories if name in previous["categories"]]
    if not finished:
        return []
    source = previous_path.parent
    for name in finished:
        results["categories"][name] = {**previous["categories"][name], "resumed_from": str(previous_path)}
        if source.resolve() != run_dir.resolve():
            for folder in (MAPS_DIR, "models"):
                if (source / folder / name).is_dir() and not (run_dir / folder / name).exists():
                    shutil.copytree(source / folder / name, run_dir / folder / name)
    log.info("resuming %s: %s already finished there, not fitted again", previous_path, ", ".join(finished))
    rows = read_scores_csv(source / "scores.csv", set(finished))
    if rows and source.resolve() != run_dir.resolve():  # here too, as if they had run here
        write_scores_csv(run_dir / "scores.csv", rows)
    return rows


def _run_tracked(cfg: DictConfig, run_dir: Path, stop: type[BaseException]) -> dict:
    tracker, results = make_tracker(cfg, run_dir), None
    try:
        results = run(cfg, run_dir, tracker)
    except (ValueError, FileNotFoundError) as error:  # bad settings or input: the message says what to fix
        raise stop(f"error: {error}") from None
    except KeyboardInterrupt:  # Ctrl-C: say what was kept (experiments/main.py prints it and exits 130)
        raise Interrupted(interrupted_message(run_dir)) from None
    finally:
        tracker.finish(results)
    return results


def interrupted_message(run_dir: Path) -> str:
    """What an interrupted run kept (the categories its results.json holds) and how it resumes (run_key.py:
    a re-run looks in outputs/ and multirun/ of its working directory, and in its own folder)."""
    record = read_results(run_dir / "results.json") or {}
    finished = sorted(record.get("categories") or {})
    resume = (f"run the same command again from {Path.cwd()} (or with hydra.run.dir={run_dir}) to resume")
    if not finished:
        return f"no category had finished, nothing kept; {resume}"
    return (f"{len(finished)} finished categor{'y' if len(finished) == 1 else 'ies'} ({', '.join(finished)}) "
            f"kept in {run_dir / 'results.json'};\n{resume} without fitting them again")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra task: one run (or one job of a multirun)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # In a multirun a failing job raises an ordinary error, so Hydra records it and runs the other jobs.
    stop = RuntimeError if HydraConfig.get().mode == RunMode.MULTIRUN else SystemExit
    done = skip_if_done(cfg, run_dir)
    if done is not None:  # resumable sweeps: the same resolved config already has a complete results.json
        log.info("skipped: this config (hash %s) is already done in %s (force=true re-runs it)", config_hash(cfg), done)
        return
    with claim_run(config_hash(cfg), run_dir) as other:
        if other is not None:  # the same config is being run right now: doing it twice doubles the work
            log.info("skipped: this config (hash %s) is being run by process %s in %s; re-run after it finishes "
                     "to pick up its results", other.get("config_hash"), other.get("pid"), other.get("run_dir"))
            return
        results = _run_tracked(cfg, run_dir, stop)
    print(format_table(results["categories"], results["mean"]))
    print(f"results: {run_dir / 'results.json'} ({results['total_time_s']:.1f}s, "
          f"peak RSS {results['peak_rss_mb']:.0f} MB)")
    if results["failed"]:
        raise stop(f"{len(results['failed'])} categories failed: {', '.join(results['failed'])} "
                   f"(see {run_dir / 'results.json'} and the log)")

