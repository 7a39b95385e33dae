"""Fit PatchCore on each requested category and evaluate it: ``python experiments/main.py [overrides]``.

Everything is built from ``conf/`` by ``hydra.utils.instantiate``; this file only wires the
pieces together and writes the run record (results.json, scores.csv, saved models) into the
Hydra output folder. Settings are checked, the dataset layout resolved and the backbone's
weights loaded before any category starts, so a bad setting fails in seconds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from core.backbones import FeatureExtractor
from core.cae import CAE
from core.data import AnomalyDataset, MVTecLayout, Sample
from core.io import write_json_atomic
from core.metrics import compute_metrics
from core.patchcore import PatchCore, Predictions
from core.thresholds import ThresholdRule, decide
from experiments.runs.anomaly_maps import MAPS_DIR, save_maps
from experiments.runs.results import (
    format_table,
    git_commit,
    mean_metrics,
    peak_rss_mb,
    versions,
    write_scores_csv,
)
from experiments.runs.run_key import config_hash, skip_if_done
from experiments.runs.tracking import NoLogger, make_tracker
from extensions.checkpoint import per_category_backbones

log = logging.getLogger("patchcore")


def build(node: DictConfig | dict):
    """``instantiate``, re-raising the component's own error: its message names the setting to fix."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        if error.__cause__ is not None:
            raise error.__cause__ from None
        raise


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def build_model(cfg: DictConfig, extractor: FeatureExtractor | None, device: torch.device) -> PatchCore | CAE:
    """PatchCore from the backbone + `patchcore`/`coreset` settings, or the CAE baseline (`model=cae`)."""
    if cfg.model.name == "cae":
        settings = {key: value for key, value in cfg.model.items() if key != "name"}
        return build({**settings, "device": str(device), "progress": cfg.progress})
    return PatchCore(
        extractor,
        embedder=build({"_target_": "core.features.PatchEmbedder", "embed_dim": cfg.patchcore.embed_dim,
                        "patch_size": cfg.patchcore.patch_size}),
        sampler=build(cfg.coreset),
        num_neighbors=cfg.patchcore.num_neighbors,
        reweight_neighbors=cfg.patchcore.reweight_neighbors,
        blur_sigma=cfg.patchcore.blur_sigma,
        device=device,
        progress=cfg.progress,
        memory=build(cfg.memory),
    )


def split_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded ``fraction`` of the nominal training images; they never enter the model."""
    if fraction <= 0:
        return samples, []
    count = max(1, round(fraction * len(samples)))
    if count >= len(samples):
        raise ValueError(f"threshold.validation_fraction={fraction} leaves no training image of {len(samples)}: "
                         f"lower it or add train/good images")
    held = set(np.random.default_rng(seed).permutation(len(samples))[:count].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def pixel_arrays(predictions: Predictions) -> tuple[np.ndarray | None, np.ndarray]:
    """Masks and maps of the images whose masks are known (None when no defect image has one)."""
    with_mask = predictions.has_mask
    if not (with_mask & (predictions.labels == 1)).any():
        return None, predictions.maps
    return predictions.masks[with_mask], predictions.maps[with_mask]


def apply_threshold(rule: ThresholdRule, nominal: Predictions | None, predictions: Predictions) -> dict:
    """The rule's image/pixel thresholds and the test set's decisions under them."""
    masks, maps = pixel_arrays(predictions)
    image_t, pixel_t = rule.thresholds(
        None if nominal is None else nominal.image_scores, None if nominal is None else nominal.maps,
        predictions.labels, predictions.image_scores, masks, maps)
    decisions = decide(predictions.labels, predictions.image_scores, image_t)
    return {**rule.describe(), "image_threshold": image_t, "pixel_threshold": pixel_t,
            "n_validation": 0 if nominal is None else len(nominal.image_scores),
            "precision": decisions.precision, "recall": decisions.recall, "f1": decisions.f1,
            "accuracy": decisions.accuracy,
            "confusion": {"tp": decisions.tp, "fp": decisions.fp, "tn": decisions.tn, "fn": decisions.fn}}


def evaluate(predictions: Predictions) -> tuple[dict, str | None]:
    """Metrics of one category; pixel metrics only over images whose masks are known."""
    masks, maps = pixel_arrays(predictions)
    note = None
    if masks is None:
        note = "no ground-truth masks: pixel metrics not computed"
    elif not predictions.has_mask[predictions.labels == 1].all():
        note = "pixel metrics over the defect types that have masks only"
    return compute_metrics(predictions.labels, predictions.image_scores, maps, masks), note


def run_category(cfg: DictConfig, layout: MVTecLayout, extractor: FeatureExtractor | None, category: str,
                 device: torch.device, run_dir: Path, rule: ThresholdRule | None = None) -> tuple[dict, list[dict]]:
    normalisation = (CAE.mean, CAE.std, CAE.interpolation) if extractor is None else (
        extractor.mean, extractor.std, extractor.interpolation)
    preprocessing = layout.preprocessing(*normalisation)
    fit_samples, held_out = split_validation(layout.train_samples(category, seed=cfg.seed),
                                             rule.validation_fraction if rule else 0.0, cfg.seed)

    def loader(dataset: AnomalyDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                          pin_memory=device.type == "cuda")

    test_loader = loader(layout.test_set(category, preprocessing))
    model = build_model(cfg, extractor, device)
    log.info("[%s] fitting on %d nominal images (%d held out for the threshold)", category, len(fit_samples),
             len(held_out))
    fit = model.fit(loader(AnomalyDataset(fit_samples, preprocessing)))
    log.info("[%s] fitted: bank %d of %d patches (extract %.1fs, coreset %.1fs)", category, fit.bank_size,
             fit.n_patches, fit.extract_s, fit.coreset_s)
    start = time.perf_counter()
    predictions = model.predict(test_loader)
    predict_s = time.perf_counter() - start
    metrics, note = evaluate(predictions)
    if note:
        log.warning("[%s] %s", category, note)
    threshold = None
    if rule is not None:
        nominal = model.predict(loader(AnomalyDataset(held_out, preprocessing))) if held_out else None
        threshold = apply_threshold(rule, nominal, predictions)
        log.info("[%s] %s threshold %.4g%s: precision %s, recall %s, confusion %s", category, rule.name,
                 threshold["image_threshold"], " (optimistic: chosen on the test labels)" if rule.optimistic else "",
                 threshold["precision"], threshold["recall"], threshold["confusion"])
    n_maps = OmegaConf.select(cfg, "viz.n", default=0) or 0
    if n_maps > 0:  # a few anomaly maps for W&B and the report (format: experiments/anomaly_maps.py)
        save_maps(run_dir / MAPS_DIR / category, predictions, test_loader.dataset, preprocessing, n_maps,
                  threshold)
    if cfg.save_model:
        saved = model.save(run_dir / "models" / category,
                           metadata={"category": category, "preprocessing": preprocessing.__dict__,
                                     "threshold": threshold, "config": OmegaConf.to_container(cfg, resolve=True)})
        log.info("[%s] model saved to %s", category, saved)
    is_cae = isinstance(model, CAE)
    entry = {
        **metrics,
        "n_train": fit.n_images,
        "n_test": len(predictions.image_scores),
        "bank_size": None if is_cae else fit.bank_size,
        "pixel_metrics_note": note,
        "timings_s": ({"train": fit.extract_s, "extract": None, "coreset": None, "predict": predict_s} if is_cae
                      else {"extract": fit.extract_s, "coreset": fit.coreset_s, "predict": predict_s}),
    }
    if threshold is not None:
        entry["threshold"] = threshold
    rows = [
        {"category": category, "path": path, "defect_type": defect, "label": int(label), "image_score": float(score)}
        for path, defect, label, score in zip(predictions.paths, predictions.defect_types, predictions.labels,
                                              predictions.image_scores)
    ]
    return entry, rows


def fit_input_size(layout: MVTecLayout, extractor: FeatureExtractor) -> None:
    """Models with fixed position embeddings (CLIP ViTs, the @336 models) dictate the crop size."""
    input_size = getattr(extractor, "input_size", None)
    if input_size and input_size != layout.image_size:
        layout.image_size, layout.resize = input_size, round(input_size * 256 / 224)
        log.info("%s expects %d px inputs: using resize %d, crop %d", extractor.name, input_size,
                 layout.resize, layout.image_size)


def run(cfg: DictConfig, run_dir: Path, tracker: NoLogger | None = None) -> dict:
    """Check everything cheap first, then fit and evaluate category by category, saving after each."""
    tracker = tracker or NoLogger()
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    build(cfg.coreset)  # rejects a bad coreset.ratio before any work
    build(cfg.memory)
    device = resolve_device(cfg.device)
    layout: MVTecLayout = build(cfg.dataset)
    categories = layout.resolve_categories(cfg.category)
    for category in categories:  # layout errors (missing folders, no images) before any model work
        layout.train_samples(category, seed=cfg.seed)
        layout.test_samples(category)
    rule: ThresholdRule | None = build(cfg.threshold) if "_target_" in cfg.threshold else None
    per_category = None
    extractor: FeatureExtractor | None = None
    if cfg.model.name == "cae":
        log.info("model: convolutional autoencoder (backbone settings unused); dataset %s, categories %s",
                 layout.name, categories)
    else:
        per_category = per_category_backbones(cfg, categories)  # fine-tuned backbones: a checkpoint per category
        extractor = build(per_category[categories[0]] if per_category else cfg.backbone)
        fit_input_size(layout, extractor)
        log.info("backbone %s (layers %s) on %s; dataset %s, categories %s", extractor.name, extractor.layers,
                 device, layout.name, categories)

    results: dict = {"config": OmegaConf.to_container(cfg, resolve=True), "categories": {}, "mean": {},
                     "failed": {}, "complete": False, "peak_rss_mb": None, "total_time_s": None,
                     "versions": versions(), "git_commit": git_commit(), "config_hash": config_hash(cfg),
                     "preprocessing": {"resize": layout.resize, "image_size": layout.image_size}}
    score_rows: list[dict] = []
    for category in categories:
        try:
            if per_category and category != categories[0]:
                extractor = build(per_category[category])
            entry, rows = run_category(cfg, layout, extractor, category, device, run_dir, rule)
        except Exception as error:  # keep finished categories; report the failure at the end
            log.exception("[%s] failed", category)
            results["failed"][category] = f"{type(error).__name__}: {error}"
        else:
            results["categories"][category] = entry
            score_rows.extend(rows)
            write_scores_csv(run_dir / "scores.csv", score_rows)
            tracker.log_category(category, entry, rows, sorted((run_dir / MAPS_DIR / category).glob("*.png")))
        results["mean"] = mean_metrics(results["categories"])
        results["complete"] = not results["failed"] and len(results["categories"]) == len(categories)
        results["peak_rss_mb"] = peak_rss_mb()
        results["total_time_s"] = time.perf_counter() - started
        write_json_atomic(run_dir / "results.json", results)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # In a multirun a failing job raises an ordinary error, so Hydra records it and runs the other jobs.
    stop = RuntimeError if HydraConfig.get().mode == RunMode.MULTIRUN else SystemExit
    done = skip_if_done(cfg, run_dir)
    if done is not None:  # resumable sweeps: the same resolved config already has a complete results.json
        log.info("skipped: this config (hash %s) is already done in %s (force=true re-runs it)", config_hash(cfg), done)
        return
    tracker, results = make_tracker(cfg, run_dir), None
    try:
        results = run(cfg, run_dir, tracker)
    except (ValueError, FileNotFoundError) as error:  # bad settings or input: the message says what to fix
        raise stop(f"error: {error}") from None
    finally:
        tracker.finish(results)
    print(format_table(results["categories"], results["mean"]))
    print(f"results: {run_dir / 'results.json'} ({results['total_time_s']:.1f}s, "
          f"peak RSS {results['peak_rss_mb']:.0f} MB)")
    if results["failed"]:
        raise stop(f"{len(results['failed'])} categories failed: {', '.join(results['failed'])} "
                   f"(see {run_dir / 'results.json'} and the log)")


if __name__ == "__main__":
    main()
