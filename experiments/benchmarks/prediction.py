"""Prediction images/s: the published pipelines' way (the starting points) against the default, at
identical scores; and WRN50's prediction against its backbone alone."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from core.backbones import TorchvisionCNN
from core.detector import Predictions, collect_predictions
from core.patchcore import PatchCore
from core.search import FaissSearch, ReferenceSearch, SpanSearch
from experiments.benchmarks.evaluation import bench_metrics
from experiments.benchmarks.fitting import fit_line, fitted, time_forward
from experiments.benchmarks.recording import Recorder, gpu_peak, measured, median_run, seconds_runs
from experiments.benchmarks.searches import DEFAULT, with_thread_counts
from experiments.benchmarks.workload import (
    RATIO,
    Workload,
    bank_with,
    have_faiss,
    loaders,
    new_model,
    preloaded,
    textures,
)

OFFICIAL_STYLE = "starting point (official-style): eager backbone, every distance in all 1024 dimensions"
ANOMALIB_STYLE = ("starting point (anomalib-style): eager backbone, every distance in the bank's span (152-d "
                  "here with channel_mean, like anomalib's concatenated features)")


@contextmanager
def starting_point_pipeline(model: PatchCore, extractor):
    """The reference implementations' way of scoring: the eager backbone (BatchNorm layers, NCHW) on whole
    batches, one batch at a time with every thread on each operation."""
    fast, chunk = model.inference_copy, model.backbone_chunk
    model.inference_copy, model.backbone_chunk = extractor.eval(), None
    try:
        yield
    finally:
        model.inference_copy, model.backbone_chunk = fast, chunk


def predict_line(rec: Recorder, model: PatchCore, test: DataLoader, variant: str,
                 reference: Predictions | None = None, ratio: float | None = None, workers: int | None = None,
                 repeats: int = 1, **extra) -> Predictions:
    """One ``predict`` line (and its predictions); with ``repeats > 1`` the median run (this machine is shared),
    all runs listed. ``reference``: the predictions of the pipeline the scores must equal."""
    runs = []
    for _ in range(repeats):
        with measured() as m:
            predictions = (model.predict(test) if workers is None
                           else collect_predictions(model.score, test, progress=False, workers=workers))
        runs.append(m)
    m = median_run(runs)
    if repeats > 1:
        extra["seconds_runs"] = seconds_runs(runs)
    auroc = float(roc_auc_score(predictions.labels, predictions.image_scores))
    quality = {"image_auroc": round(auroc, 4)}
    if reference is not None:
        quality["auroc_diff"] = round(auroc - float(roc_auc_score(reference.labels, reference.image_scores)), 4)
        quality["max_abs_map_diff"] = float(np.abs(predictions.maps - reference.maps).max())
        # relative to the largest reference value: squared distances make absolute differences large
        quality["max_rel_map_diff"] = quality["max_abs_map_diff"] / float(np.abs(reference.maps).max())
        quality["max_abs_score_diff"] = float(np.abs(predictions.image_scores - reference.image_scores).max())
    rec.emit("predict", len(predictions.image_scores), model.bank.dim, ratio, m["seconds"],
             len(predictions.image_scores), m["peak_rss_mb"], variant=variant, bank_size=len(model.bank),
             search_dim=model.bank.search_dim, **quality, **gpu_peak(m), **extra)
    return predictions


def bench_predictions(rec: Recorder, work: Workload, model: PatchCore, extractor, test: DataLoader,
                      bank_features: torch.Tensor, aggregation: str) -> None:
    """The two starting points, the fast backbone alone, the default (and, on a CPU, one thread and faiss
    ivf) against the 10% bank, every score checked against the official-style pipeline's."""
    tag = {"aggregation": aggregation}
    with starting_point_pipeline(model, extractor):  # the two published implementations, re-run here
        model.bank = bank_with(bank_features, ReferenceSearch())
        reference = predict_line(rec, model, test, OFFICIAL_STYLE, workers=1, **tag)
        model.bank = bank_with(bank_features, SpanSearch())
        predict_line(rec, model, test, ANOMALIB_STYLE, reference, workers=1, **tag)
    predict_line(rec, model, test, "fast backbone, every distance in the bank span", reference, **tag)
    model.bank = bank_with(bank_features)
    model.predict(test)  # warm-up: numba's compiled kernels, the embedder's projection
    tag["strategy"] = model.bank.strategy.name
    predict_line(rec, model, test, DEFAULT, reference, repeats=5 if work.on_cpu else 3, **tag)
    if aggregation == "official":  # the evaluation of the same maps: once is enough
        bench_metrics(rec, reference, aggregation=aggregation)
    if not work.on_cpu:
        return
    with_thread_counts(lambda: predict_line(rec, model, test, DEFAULT, reference, repeats=3, **tag))
    if have_faiss():
        for nprobe in (16, 64) if "all" in work.extra else (16,):
            model.bank = bank_with(bank_features, FaissSearch("ivf", nprobe=nprobe))
            predict_line(rec, model, test, f"faiss ivf nprobe={nprobe}", reference, aggregation=aggregation)


def bench_wrn50(rec: Recorder, work: Workload) -> None:
    """WRN50 (random seeded weights: the timing does not depend on them) fitted on a few training images;
    prediction images/s (loading, backbone, embedding, search, maps) against the backbone alone on the
    preloaded test images (its ``inference_copy``, as prediction runs it). Issue goal: >= 0.8x."""
    extractor = TorchvisionCNN("wide_resnet50_2", ["layer2", "layer3"], pretrained=False).eval().to(work.device)
    dataset = textures(work.root, work.plan["images"], train_limit=work.plan["wrn50_images"])
    train, test = loaders(dataset, extractor)
    model = new_model(extractor, RATIO, None, "official", work.device)
    tag = {"study": "wrn50", "backbone": "wide_resnet50_2 (random seeded weights)", "aggregation": "official"}
    report, m = fitted(model, train)
    fit_line(rec, "fit", model, report, m, RATIO, variant="WRN50, float32 buffer in memory", **tag)
    images = preloaded(dataset, extractor, "test").to(work.device).contiguous(memory_format=torch.channels_last)
    per_call = model.backbone_chunk or 8
    m = time_forward(model.inference_copy, images, per_call)
    line = rec.emit("backbone_only", len(images), None, None, m["seconds"], len(images), m["peak_rss_mb"],
                    variant=f"WRN50 backbone forward (BatchNorm folded, channels-last, {per_call} images per call)",
                    **gpu_peak(m), **tag)
    model.predict(test)  # warm-up
    repeats = 1 if len(train.dataset) < 10 else 3
    predict_line(rec, model, test, f"WRN50 {DEFAULT}", repeats=repeats, strategy=model.bank.strategy.name,
                 backbone_images_per_s=line["items_per_s"], **tag)
    if "export" not in work.skip and work.on_cpu:  # float32 and INT8 exports of WRN50 (issue 29)
        from experiments.benchmarks.export_speed import bench_exported

        bench_exported(rec, model, test, [sample.path for sample in train.dataset.samples], **tag)
