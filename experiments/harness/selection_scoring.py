"""One candidate's proxy score (docs/selection.md): its PatchCore fitted on (a seeded subset of) the category's
training part, scored on the held-out nominal images and the synthetic anomalies made from them.

The model is built by experiments/harness/model_build.py, the very build main.py runs (the crop a fixed-input
backbone dictates, per-category fine-tuned checkpoints), so a score is the score of what ``main.py
selection=...`` runs. Only train/good is read.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from core.data import AnomalyDataset, Sample
from core.patchcore import PatchCore
from experiments.harness.components import build, resolve_device
from experiments.harness.model_build import ModelBuilder
from experiments.harness.run_key import config_hash
from experiments.harness.run_settings import validate
from extensions.proxy import ProxyConfig, ProxySet, split_holdout
from extensions.synthetic import make_synthetic


def proxy_settings(node: Mapping) -> ProxyConfig:
    """The ``select`` node as a ProxyConfig: its checks (holdout range, metric, kinds) are the proxy's own."""
    try:
        return ProxyConfig(holdout=node["holdout"], max_holdout=node["max_holdout"], metric=node["metric"],
                           kinds=list(node["kinds"]), seed=node["seed"])
    except ValueError as error:
        raise ValueError(str(error).replace("proxy.", "select.")) from None


def proxy_record(proxy: ProxyConfig) -> dict:
    """The proxy settings as selection.json and score_run.json record them."""
    return {"seed": proxy.seed, "holdout": proxy.holdout, "max_holdout": proxy.max_holdout, "kinds": proxy.kinds,
            "metric": proxy.metric}


def fit_subset(train: Sequence[Sample], n_fit: int | None, seed: int) -> list[Sample]:
    """The first ``n_fit`` images of a seeded order of the training part, in their original order (nested: a
    smaller subset lies inside every larger one); all of it for None or ``n_fit >= len(train)``."""
    if n_fit is None or n_fit >= len(train):
        return list(train)
    picked = sorted(np.random.default_rng([seed, 2]).permutation(len(train))[:n_fit].tolist())
    return [train[i] for i in picked]


def proxy_score(cfg: DictConfig, category: str, proxy: ProxyConfig, cache_dir: Path | None,
                n_fit: int | None = None) -> dict:
    """Fit ``cfg``'s PatchCore on the category's training part (or its ``fit_subset`` of ``n_fit`` images) and
    score the proxy set (train/good only)."""
    settings = validate(cfg)
    torch.manual_seed(settings.seed)
    if "extractor" not in cfg.model:
        raise ValueError("selection scores PatchCore configurations: model=patchcore")
    if cache_dir is not None and cfg.storage.cache_dir is None:  # shared backbone passes are not repeated
        cfg = cfg.copy()
        cfg.storage.cache_dir = str(cache_dir)
    layout = build(cfg.dataset)
    model = ModelBuilder(cfg, layout, resolve_device(settings.device), [category]).model(category)
    if not isinstance(model, PatchCore):
        raise ValueError(f"selection scores PatchCore configurations, not {type(model).__name__}")
    preprocessing = layout.preprocessing(model.mean, model.std, model.interpolation)
    train, held = split_holdout(layout.train_samples(category, seed=settings.seed), proxy.holdout, proxy.seed,
                                proxy.max_holdout)
    train = fit_subset(train, n_fit, proxy.seed)
    proxy_set = ProxySet(make_synthetic(held, preprocessing, proxy.kinds, proxy.seed), model.mean, model.std,
                         proxy.metric)
    started = time.perf_counter()
    fit = model.fit(DataLoader(AnomalyDataset(train, preprocessing), batch_size=settings.batch_size))
    metrics, _, _ = proxy_set.score_model(model)
    return {**metrics, "n_fit": len(train), "n_held_out": len(held), "image_size": layout.image_size,
            "bank_size": fit.bank_size, "fit_time_s": round(time.perf_counter() - started, 3)}


def score_key(cfg: DictConfig, category: str, proxy: ProxyConfig, n_fit: int | None = None) -> str:
    """What a score depends on: the composed config (its hash and seed), the category, the proxy settings, and
    the training subset (``n_fit`` images of ``fit_subset``; None: the whole training part)."""
    parts = [config_hash(cfg), int(cfg.seed), category, proxy.holdout, proxy.max_holdout, proxy.metric,
             proxy.kinds, proxy.seed]
    if n_fit is not None:  # the whole part keeps the key it had before subsets existed
        parts.append(["fit_subset", n_fit])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
