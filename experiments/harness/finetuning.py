"""Fine-tuning a backbone on each category's nominal training images (``experiments/finetune.py``).

Only ``layout.train_samples`` (the train/<good> images) is read, never a test image. With the proxy
on (``proxy.enabled``, the default) a seeded ``proxy.holdout`` fraction of them is held out: never
trained on, it and the synthetic anomalies made from it select the checkpoint (extensions/proxy.py).
Each category's result goes to ``<checkpoint_dir>/<method>/<backbone>/<category>.pt`` (+ .json sidecar,
.loss.jsonl and .proxy.jsonl logs); the run is tracked like ``main.py``'s (experiments/harness/finetune_tracking.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from core.data import AnomalyDataset, MVTecLayout
from core.io import remove_dead_temporaries
from experiments.harness.components import build, resolve_device
from experiments.harness.finetune_tracking import FinetuneTracking
from extensions.checkpoint import CheckpointFiles, hold_checkpoint, is_finetuned
from extensions.objective import Objective
from extensions.proxy import ProxyConfig, ProxyValidator, bank_indices, split_holdout
from extensions.synthetic import make_synthetic
from extensions.training import TrainConfig, fine_tune

log = logging.getLogger("finetune")


METHOD_DIR = Path(__file__).resolve().parents[2] / "conf" / "method"
RECIPE = "docs/architecture.md, recipe 'Add a fine-tuning method'"


def method_names() -> list[str]:
    """The fine-tuning methods, one per conf/method/<name>.yaml: the one list that make targets, sweeps and
    studies derive theirs from."""
    return sorted(path.stem for path in METHOD_DIR.glob("*.yaml"))


def method_parts(method: Mapping) -> tuple[TrainConfig, dict]:
    """A resolved ``method`` node -> (its ``train:`` settings, its ``objective:`` node with ``_target_``)."""
    missing = [key for key in ("name", "train", "objective") if not isinstance(method.get(key), str | Mapping)]
    if missing:
        raise ValueError(f"method {method.get('name')!r} has no {missing}: a method config holds name, train "
                         f"(shared settings) and objective (_target_ + the method's own settings); see {RECIPE}")
    try:
        train = TrainConfig(**method["train"])
    except TypeError as error:  # a key TrainConfig does not have
        raise ValueError(f"method.train: {error}; the shared settings are {[f.name for f in fields(TrainConfig)]} "
                         "(a method's own settings go under method.objective)") from None
    return train, dict(method["objective"])


def build_objective(objective: Mapping, extractor) -> Objective:
    """The method's objective around ``extractor``: ``objective._target_`` must name an ``Objective`` subclass."""
    kwargs = dict(objective)
    target = kwargs.pop("_target_", None)
    try:
        cls = get_class(str(target)) if target else None
    except Exception as error:  # hydra wraps import errors in several types
        raise ValueError(f"method.objective._target_={target!r} cannot be imported: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"method.objective._target_={target!r}: name a subclass of extensions.objective.Objective "
                         f"({RECIPE})")
    return cls(extractor, **kwargs)


def proxy_config(cfg: DictConfig) -> ProxyConfig:
    node = cfg.get("proxy")
    return ProxyConfig(**OmegaConf.to_container(node, resolve=True)) if node is not None else ProxyConfig(enabled=False)


def datasets(layout: MVTecLayout, category: str, preprocessing, proxy: ProxyConfig, seed: int, extractor,
             device) -> tuple[AnomalyDataset, ProxyValidator | None]:
    """(training images, proxy validator or None): the held-out part and its synthetic anomalies when on."""
    samples = layout.train_samples(category, seed=seed)
    if not proxy.enabled:
        return AnomalyDataset(samples, preprocessing), None
    train, held = split_holdout(samples, proxy.holdout, proxy.seed, proxy.max_holdout)
    dataset = AnomalyDataset(train, preprocessing)
    synthetic = make_synthetic(held, preprocessing, proxy.kinds, proxy.seed)
    bank_images = torch.stack([dataset[i]["image"] for i in bank_indices(len(dataset), proxy.max_bank_images,
                                                                           proxy.seed)])
    return dataset, ProxyValidator(proxy, bank_images, synthetic, extractor.mean, extractor.std, device)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, dict]:
    """Fine-tune every requested category in turn; return each one's sidecar record.

    ``run_dir`` (the Hydra run folder) holds the W&B files; without one nothing is tracked beyond the JSONL logs.
    """
    if is_finetuned(cfg.backbone):
        raise ValueError(
            f"backbone={cfg.backbone.name} is already a fine-tuned checkpoint: fine-tune a base backbone "
            "(backbone=wrn50, resnet18, resnet50 or effnet_lite0)"
        )
    method = OmegaConf.to_container(cfg.method, resolve=True)
    train_config, objective_node = method_parts(method)
    proxy = proxy_config(cfg)
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = False  # deterministic kernels where the GPU offers them
    torch.backends.cudnn.deterministic = True
    layout: MVTecLayout = build(cfg.dataset)
    categories = layout.resolve_categories(cfg.category)
    for category in categories:  # missing folders / images, or too few to hold some out, fail before any training
        samples = layout.train_samples(category, seed=train_config.seed)
        if proxy.enabled:
            split_holdout(samples, proxy.holdout, proxy.seed, proxy.max_holdout)
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("method", "backbone", "dataset")}
    with _hold_checkpoints(cfg.checkpoint_dir, method["name"], cfg.backbone.name, categories):
        log.info("fine-tuning %s with %s on %s (%s) on %s", cfg.backbone.name, method["name"], layout.name,
                 categories, device)
        tracking = FinetuneTracking.start(cfg, run_dir)
        records, complete = {}, False
        try:
            for category in categories:
                torch.manual_seed(train_config.seed)
                extractor = build(cfg.backbone)  # fresh pretrained weights for every category
                objective = build_objective(objective_node, extractor)
                preprocessing = layout.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
                dataset, validator = datasets(layout, category, preprocessing, proxy, train_config.seed, extractor,
                                              device)
                files = CheckpointFiles.for_run(cfg.checkpoint_dir, method["name"], cfg.backbone.name, category)
                identity = {"method": method["name"], "category": category, "dataset": layout.name,
                            "base": extractor.spec(), "config": config}
                log.info("[%s] %d nominal training images%s -> %s", category, len(dataset),
                         f", {len(validator.nominal)} held out for the proxy" if validator else "", files.weights)
                records[category] = fine_tune(
                    objective, dataset, train_config, files, identity, device=device,
                    checkpoint_every=cfg.checkpoint_every, num_workers=cfg.num_workers, progress=cfg.progress,
                    resume=cfg.resume, proxy=validator, tracker=tracking,
                )
                tracking.log_selected(category, records[category])
            complete = True
        finally:
            tracking.finish(complete)
    return records


@contextmanager
def _hold_checkpoints(root: str | Path, method: str, backbone: str, categories: list[str]) -> Iterator[None]:
    """Every category's checkpoint held (``hold_checkpoint``) before any model is built: a second fine-tune of one
    of them is refused in seconds, naming the process that has it. Under the lock, the temporaries a killed
    earlier run left beside the checkpoint are removed."""
    with ExitStack() as held:
        for category in categories:
            files = CheckpointFiles.for_run(root, method, backbone, category)
            held.enter_context(hold_checkpoint(files))
            for leftover in remove_dead_temporaries(files.weights.parent, prefix=f".{category}.", recursive=False):
                log.info("removed %s, left unfinished by a process that died", leftover)
        yield
