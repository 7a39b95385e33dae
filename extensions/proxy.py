"""Checkpoint selection without test labels: a proxy validation on held-out nominal images.

A seeded ``holdout`` fraction of ``train/good`` is set aside before fine-tuning and never trained on;
synthetic anomalies with exact masks are made from it (extensions/synthetic.py). Every
``eval_every`` steps (and at step 0, the pretrained weights, and at the last step) a small PatchCore
(core.patchcore.PatchCore with the current weights, greedy coreset of ``coreset_ratio``) is fitted
on the training part and scores the held-out nominal images and the synthetic anomalies:

    image_auroc   held-out nominal (label 0) vs synthetic anomalies (label 1), image scores
    pixel_auroc   every pixel of those images against the exact synthetic masks
    score         what selection maximises: ``metric`` = image_auroc | pixel_auroc | mean_auroc (their mean)

``Selection`` keeps the weights of the best evaluation (ties keep the earlier one, so step 0 stays
unless fine-tuning beats it) and says when ``patience`` evaluations in a row brought no gain (early
stop). The collapse monitors (extensions/monitors.py) are computed at every evaluation. Test images
are never read: the proxy only ever sees ``train/good`` samples.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from core.backbones import FeatureExtractor
from core.coreset import GreedyCoresetSampler
from core.data import Sample
from core.features import PatchEmbedder
from core.patchcore import PatchCore
from extensions.monitors import check_collapse, distance_spread, effective_rank
from extensions.synthetic import SEVERITY, SYNTHETIC_KINDS, SyntheticSet, check_kinds

log = logging.getLogger("finetune")

METRICS = ("image_auroc", "pixel_auroc", "mean_auroc")
_CHUNK = 16  # images per scoring call


@dataclass
class ProxyConfig:
    """The ``proxy`` node of conf/finetune.yaml."""

    enabled: bool = True  # false: train on every image, keep the last step's weights (no selection)
    holdout: float = 0.2  # fraction of train/good held out (never trained on) for the proxy
    max_holdout: int | None = 30  # at most this many held out (null: no cap): the proxy's cost stays flat
    max_bank_images: int | None = 60  # the proxy PatchCore's bank: a seeded subset of the training part (null: all)
    eval_every: int = 20  # steps between evaluations (plus step 0 and the last step)
    patience: int | None = 2  # evaluations without gain before stopping early (null: never stop early)
    metric: str = "mean_auroc"  # image_auroc | pixel_auroc | mean_auroc: what selection maximises
    kinds: list[str] = field(default_factory=lambda: list(SYNTHETIC_KINDS))
    coreset_ratio: float = 0.1  # the proxy PatchCore's coreset
    embed_dim: int | None = 1024  # its patch features (conf/model/patchcore.yaml patchcore.embedder.embed_dim)
    patch_size: int = 3
    collapse_fraction: float = 0.5  # warn when the effective rank falls below this fraction of step 0's
    seed: int = 0  # the held-out split and the synthetic anomalies (the same for every fine-tuning seed)

    def __post_init__(self) -> None:
        self.kinds = check_kinds(list(self.kinds))
        if not 0 < self.holdout < 1:
            raise ValueError(f"proxy.holdout={self.holdout} must be a fraction in (0, 1)")
        for key in ("max_holdout", "max_bank_images"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"proxy.{key}={value} must be at least 1, or null for no cap")
        if self.eval_every < 1 or (self.patience is not None and self.patience < 1):
            raise ValueError(f"proxy.eval_every={self.eval_every} and proxy.patience={self.patience} must be >= 1 "
                             "(proxy.patience=null: never stop early)")
        if self.metric not in METRICS:
            raise ValueError(f"proxy.metric={self.metric!r}: choose one of {METRICS}")
        if not 0 < self.collapse_fraction <= 1:
            raise ValueError(f"proxy.collapse_fraction={self.collapse_fraction} must be in (0, 1]")


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int,
                  cap: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """(training part, held-out part): a seeded ``fraction`` of the samples (at least one, at most ``cap``)."""
    n = len(samples)
    held = max(1, min(round(fraction * n), cap if cap is not None else n))
    if n - held < 1:
        raise ValueError(f"{n} training images cannot be split for the proxy (proxy.holdout={fraction}): "
                         "add images, or set proxy.enabled=false")
    chosen = set(np.random.default_rng(seed).permutation(n)[:held].tolist())
    return ([s for i, s in enumerate(samples) if i not in chosen], [s for i, s in enumerate(samples) if i in chosen])


def bank_indices(n: int, cap: int | None, seed: int) -> list[int]:
    """The training images the proxy's bank is fitted on: all, or a seeded sorted subset of ``cap``."""
    if cap is None or n <= cap:
        return list(range(n))
    return sorted(np.random.default_rng([seed, 1]).permutation(n)[:cap].tolist())


class ProxySet:
    """The held-out nominal images and their synthetic anomalies, normalised for a backbone, and how any fitted
    PatchCore is scored on them: the one proxy score of checkpoint selection (``ProxyValidator``) and of
    configuration selection (experiments/harness/selection.py)."""

    def __init__(self, synthetic: SyntheticSet, mean: Sequence[float], std: Sequence[float], metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(f"proxy metric {metric!r}: choose one of {METRICS}")
        self.metric = metric
        self.nominal = synthetic.normalised(synthetic.nominal, mean, std)
        self.anomalies = synthetic.normalised(synthetic.anomalies, mean, std)
        self.masks = synthetic.masks
        self.kinds = synthetic.kinds
        self.severities = synthetic.severities

    def score_model(self, model: PatchCore) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(metrics row, nominal image scores, anomaly image scores) of a fitted model; the row is empty
        (``score`` None) when a score is not finite."""
        nominal_scores, nominal_maps = self._score(model, self.nominal)
        anomaly_scores, anomaly_maps = self._score(model, self.anomalies)
        if not (torch.isfinite(nominal_scores).all() and torch.isfinite(anomaly_scores).all()):
            return {"image_auroc": None, "pixel_auroc": None, "score": None}, nominal_scores, anomaly_scores
        return self._metrics(nominal_scores, anomaly_scores, nominal_maps, anomaly_maps), nominal_scores, \
            anomaly_scores

    @staticmethod
    def _score(model: PatchCore, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [model.score(images[i : i + _CHUNK]) for i in range(0, len(images), _CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _metrics(self, nominal_scores, anomaly_scores, nominal_maps, anomaly_maps) -> dict:
        labels = np.r_[np.zeros(len(nominal_scores)), np.ones(len(anomaly_scores))]
        scores = torch.cat([nominal_scores, anomaly_scores]).double().numpy()
        image = float(roc_auc_score(labels, scores))
        pixel_labels = torch.cat([torch.zeros_like(nominal_maps, dtype=torch.bool), self.masks]).flatten().numpy()
        pixel = float(roc_auc_score(pixel_labels, torch.cat([nominal_maps, anomaly_maps]).flatten().numpy()))
        row = {"image_auroc": image, "pixel_auroc": pixel}
        row["score"] = {"image_auroc": image, "pixel_auroc": pixel, "mean_auroc": (image + pixel) / 2}[
            self.metric]
        nominal = nominal_scores.double().numpy()
        for kind in dict.fromkeys(self.kinds):
            picked = anomaly_scores[[i for i, k in enumerate(self.kinds) if k == kind]].double().numpy()
            row[f"image_auroc_{kind}"] = _auroc(nominal, picked)
        for band, picked in severity_bands(self.severities).items():
            row[f"image_auroc_{band}"] = _auroc(nominal, anomaly_scores[picked].double().numpy()) if picked else None
        return row


class ProxyValidator:
    """Scores an extractor's current weights on the proxy set (see the module docstring)."""

    def __init__(self, config: ProxyConfig, train_images: torch.Tensor, synthetic: SyntheticSet,
                 mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu") -> None:
        self.config = config
        self.train_images = train_images  # [n, 3, S, S], normalised: the bank's images
        self.proxy_set = ProxySet(synthetic, mean, std, config.metric)
        self.nominal, self.anomalies = self.proxy_set.nominal, self.proxy_set.anomalies
        self.masks, self.kinds, self.severities = self.proxy_set.masks, self.proxy_set.kinds, self.proxy_set.severities
        self.device = torch.device(device)

    def sizes(self) -> dict[str, int]:
        return {"proxy_train_images": len(self.train_images), "proxy_nominal": len(self.nominal),
                "proxy_anomalies": len(self.anomalies)}

    def evaluate(self, extractor: FeatureExtractor, step: int) -> dict:
        """One evaluation row: proxy AUROCs (overall and per kind), the selection score, the feature monitors."""
        started = time.perf_counter()
        config = self.config
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training RNG stream is not touched
            model = PatchCore(extractor, PatchEmbedder(config.embed_dim, config.patch_size),
                              GreedyCoresetSampler(config.coreset_ratio, seed=config.seed), device=self.device,
                              progress=False)
            model.fit([self.train_images[i : i + _CHUNK] for i in range(0, len(self.train_images), _CHUNK)])
            features, _ = model.embed(self.nominal)
            features = features.reshape(-1, features.shape[-1])
            metrics, _, _ = self.proxy_set.score_model(model)
            row: dict = {"step": step}
            if metrics["score"] is not None and bool(torch.isfinite(features).all()):
                distances, _ = model.bank.search(features, k=1)
                row |= metrics
                row |= {"effective_rank": effective_rank(features), **distance_spread(distances)}
            else:  # diverged weights: nothing to score; never selected, counts as collapsed
                row |= {"image_auroc": None, "pixel_auroc": None, "score": None, "effective_rank": 0.0}
        row["bank_size"] = len(model.bank)
        row["eval_time_s"] = round(time.perf_counter() - started, 3)
        return row


SEVERITY_BANDS = ("subtle", "medium", "obvious")  # thirds of the severity range (extensions/synthetic.py SEVERITY)


def severity_bands(severities: Sequence[float]) -> dict[str, list[int]]:
    """The anomalies (indices) in each third of the severity range: subtle, medium, obvious."""
    lo, hi = SEVERITY
    bands: dict[str, list[int]] = {band: [] for band in SEVERITY_BANDS}
    for i, s in enumerate(severities):
        bands[SEVERITY_BANDS[min(2, int(3 * (s - lo) / (hi - lo)))]].append(i)
    return bands


def _auroc(nominal: np.ndarray, anomalous: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(nominal)), np.ones(len(anomalous))], np.r_[nominal, anomalous]))


class Selection:
    """The best evaluation so far (its weights kept on the CPU), early stopping, the collapse warning."""

    def __init__(self, patience: int | None, collapse_fraction: float) -> None:
        self.patience, self.collapse_fraction = patience, collapse_fraction
        self.rows: list[dict] = []
        self.best_index: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.since_best = 0

    @property
    def best(self) -> dict | None:
        return None if self.best_index is None else self.rows[self.best_index]

    @property
    def exhausted(self) -> bool:
        """``patience`` evaluations in a row without gain: stop early (never when ``patience`` is None: a
        training-length curve must run its whole length)."""
        return self.patience is not None and self.best_index is not None and self.since_best >= self.patience

    def update(self, row: dict, extractor: FeatureExtractor) -> bool:
        """Record an evaluation row (adds ``collapse_warning``); keep the weights when it is the best so far."""
        start = self.rows[0]["effective_rank"] if self.rows else None
        row["collapse_warning"] = start is not None and check_collapse(
            row["effective_rank"], start, self.collapse_fraction, row["step"])
        self.rows.append(row)
        score = row.get("score")
        best = self.best
        if score is not None and math.isfinite(score) and (best is None or score > best["score"]):
            self.best_index, self.since_best = len(self.rows) - 1, 0
            self.best_state = {name: value.detach().cpu().clone() for name, value in extractor.state_dict().items()}
            return True
        self.since_best += 1
        return False

    def state_dict(self) -> dict:
        return {"rows": self.rows, "best_index": self.best_index, "best_state": self.best_state,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.best_index = list(state["rows"]), state["best_index"]
        self.best_state, self.since_best = state["best_state"], int(state["since_best"])

    def summary(self) -> dict:
        """What the sidecar records under ``selection``."""
        best = self.best or {}
        return {
            "selected_step": best.get("step"),
            "proxy": {key: best.get(key) for key in ("score", "image_auroc", "pixel_auroc")},
            "monitors": {key: best.get(key) for key in MONITOR_KEYS},
            "start": {key: self.rows[0].get(key) for key in ("score", "image_auroc", "pixel_auroc", *MONITOR_KEYS)}
            if self.rows else {},
            "evaluations": len(self.rows),
            "collapse_warnings": [row["step"] for row in self.rows if row.get("collapse_warning")],
        }


MONITOR_KEYS = ("effective_rank", "nn_distance_mean", "nn_distance_std", "nn_distance_cv", "weight_distance",
                "weight_distance_rel")
