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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from core.backbones import FeatureExtractor
from core.data import MVTecLayout
from core.io import write_json_atomic
from core.metrics import compute_metrics
from core.patchcore import PatchCore, Predictions
from experiments.results import (
    format_table,
    git_commit,
    mean_metrics,
    peak_rss_mb,
    versions,
    write_scores_csv,
)

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


def build_model(cfg: DictConfig, extractor: FeatureExtractor, device: torch.device) -> PatchCore:
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
    )


def evaluate(predictions: Predictions) -> tuple[dict, str | None]:
    """Metrics of one category; pixel metrics only over images whose masks are known."""
    with_mask = predictions.has_mask
    anomalous_with_mask = with_mask & (predictions.labels == 1)
    note = None
    masks = maps = None
    if anomalous_with_mask.any():
        masks, maps = predictions.masks[with_mask], predictions.maps[with_mask]
        if not with_mask[predictions.labels == 1].all():
            note = "pixel metrics over the defect types that have masks only"
    else:
        note = "no ground-truth masks: pixel metrics not computed"
    metrics = compute_metrics(predictions.labels, predictions.image_scores,
                              maps if maps is not None else predictions.maps, masks)
    return metrics, note


def run_category(cfg: DictConfig, layout: MVTecLayout, extractor: FeatureExtractor, category: str,
                 device: torch.device, run_dir: Path) -> tuple[dict, list[dict]]:
    preprocessing = layout.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
    loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    train_loader = DataLoader(layout.train_set(category, preprocessing, seed=cfg.seed), **loader_args)
    test_loader = DataLoader(layout.test_set(category, preprocessing), **loader_args)

    model = build_model(cfg, extractor, device)
    log.info("[%s] fitting on %d nominal images", category, len(train_loader.dataset))
    fit = model.fit(train_loader)
    log.info("[%s] bank %d of %d patches (extract %.1fs, coreset %.1fs)", category, fit.bank_size,
             fit.n_patches, fit.extract_s, fit.coreset_s)
    start = time.perf_counter()
    predictions = model.predict(test_loader)
    predict_s = time.perf_counter() - start
    metrics, note = evaluate(predictions)
    if note:
        log.warning("[%s] %s", category, note)
    if cfg.save_model:
        saved = model.save(run_dir / "models" / category,
                           metadata={"category": category, "preprocessing": preprocessing.__dict__,
                                     "config": OmegaConf.to_container(cfg, resolve=True)})
        log.info("[%s] model saved to %s", category, saved)
    entry = {
        **metrics,
        "n_train": fit.n_images,
        "n_test": len(predictions.image_scores),
        "bank_size": fit.bank_size,
        "pixel_metrics_note": note,
        "timings_s": {"extract": fit.extract_s, "coreset": fit.coreset_s, "predict": predict_s},
    }
    rows = [
        {"category": category, "path": path, "defect_type": defect, "label": int(label), "image_score": float(score)}
        for path, defect, label, score in zip(predictions.paths, predictions.defect_types, predictions.labels,
                                              predictions.image_scores)
    ]
    return entry, rows


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Check everything cheap first, then fit and evaluate category by category, saving after each."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    build(cfg.coreset)  # rejects a bad coreset.ratio before any work
    device = resolve_device(cfg.device)
    layout: MVTecLayout = build(cfg.dataset)
    categories = layout.resolve_categories(cfg.category)
    for category in categories:  # layout errors (missing folders, no images) before any model work
        layout.train_samples(category, seed=cfg.seed)
        layout.test_samples(category)
    extractor: FeatureExtractor = build(cfg.backbone)
    log.info("backbone %s (layers %s) on %s; dataset %s, categories %s", extractor.name, extractor.layers,
             device, layout.name, categories)

    results: dict = {"config": OmegaConf.to_container(cfg, resolve=True), "categories": {}, "mean": {},
                     "failed": {}, "complete": False, "peak_rss_mb": None, "total_time_s": None,
                     "versions": versions(), "git_commit": git_commit()}
    score_rows: list[dict] = []
    for category in categories:
        try:
            entry, rows = run_category(cfg, layout, extractor, category, device, run_dir)
        except Exception as error:  # keep finished categories; report the failure at the end
            log.exception("[%s] failed", category)
            results["failed"][category] = f"{type(error).__name__}: {error}"
        else:
            results["categories"][category] = entry
            score_rows.extend(rows)
            write_scores_csv(run_dir / "scores.csv", score_rows)
        results["mean"] = mean_metrics(results["categories"])
        results["complete"] = not results["failed"] and len(results["categories"]) == len(categories)
        results["peak_rss_mb"] = peak_rss_mb()
        results["total_time_s"] = time.perf_counter() - started
        write_json_atomic(run_dir / "results.json", results)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, run_dir)
    except (ValueError, FileNotFoundError) as error:  # bad settings or input: the message says what to fix
        raise SystemExit(f"error: {error}") from None
    print(format_table(results["categories"], results["mean"]))
    print(f"results: {run_dir / 'results.json'} ({results['total_time_s']:.1f}s, "
          f"peak RSS {results['peak_rss_mb']:.0f} MB)")
    if results["failed"]:
        raise SystemExit(f"{len(results['failed'])} categories failed: {', '.join(results['failed'])} "
                         f"(see {run_dir / 'results.json'} and the log)")


if __name__ == "__main__":
    main()
