"""Fine-tuning a backbone on each category's nominal training images (``experiments/finetune.py``).

Only ``layout.train_set`` (the train/<good> images) is read, never a test image. Each category's result
goes to ``<checkpoint_dir>/<method>/<backbone>/<category>.pt`` (+ .json sidecar, .loss.jsonl log).
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from core.data import MVTecLayout
from experiments.runs.components import build, resolve_device
from extensions.checkpoint import CheckpointFiles
from extensions.objective import Objective
from extensions.training import TrainConfig, fine_tune

log = logging.getLogger("finetune")


def build_objective(method: dict, extractor) -> Objective:
    """The method's objective around ``extractor``; only a class in extensions/ is built."""
    _, objective_kwargs = TrainConfig.split(method)
    target = objective_kwargs.pop("_target_", None)
    if target is None or not str(target).startswith("extensions."):
        raise ValueError(f"method._target_={target!r}: name an objective class in extensions/")
    return get_class(target)(extractor, **objective_kwargs)


def run(cfg: DictConfig) -> dict[str, dict]:
    """Fine-tune every requested category in turn; return each one's sidecar record."""
    if str(cfg.backbone.get("_target_", "")).startswith("extensions."):
        raise ValueError(
            f"backbone={cfg.backbone.name} is already a fine-tuned checkpoint: fine-tune a base backbone "
            "(backbone=wrn50, resnet18, resnet50 or effnet_lite0)"
        )
    method = OmegaConf.to_container(cfg.method, resolve=True)
    train_config, _ = TrainConfig.split(method)
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = False  # deterministic kernels where the GPU offers them
    torch.backends.cudnn.deterministic = True
    layout: MVTecLayout = build(cfg.dataset)
    categories = layout.resolve_categories(cfg.category)
    for category in categories:  # missing folders / images fail before any training
        layout.train_samples(category, seed=train_config.seed)
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("method", "backbone", "dataset")}
    log.info("fine-tuning %s with %s on %s (%s) on %s", cfg.backbone.name, method["name"], layout.name,
             categories, device)

    records = {}
    for category in categories:
        torch.manual_seed(train_config.seed)
        extractor = build(cfg.backbone)  # fresh pretrained weights for every category
        objective = build_objective(method, extractor)
        preprocessing = layout.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
        dataset = layout.train_set(category, preprocessing, seed=train_config.seed)
        files = CheckpointFiles.for_run(cfg.checkpoint_dir, method["name"], cfg.backbone.name, category)
        identity = {"method": method["name"], "category": category, "dataset": layout.name,
                    "base": extractor.spec(), "config": config}
        log.info("[%s] %d nominal training images -> %s", category, len(dataset), files.weights)
        records[category] = fine_tune(
            objective, dataset, train_config, files, identity, device=device,
            checkpoint_every=cfg.checkpoint_every, num_workers=cfg.num_workers, progress=cfg.progress,
            resume=cfg.resume,
        )
    return records
