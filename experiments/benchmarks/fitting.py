"""Backbone-only throughput and the fit (extraction + coreset): cold, from a warm cache, 5,000 images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from core.features import PatchEmbedder
from core.patchcore import PatchCore
from experiments.benchmarks.recording import Recorder, gpu_peak, measured
from experiments.benchmarks.workload import RATIO, Workload, loaders, model_bytes, new_model, textures


def forward_variants(extractor, images: torch.Tensor, device: torch.device) -> list[tuple]:
    """``(name, network, inputs, images per call)``: as the reference implementations run the backbone
    (eager, 8 images per call) and as PatchCore does (its ``inference_copy``, channels-last, its
    ``backbone_chunk`` images per call; whole batches of 8 on a GPU)."""
    model = new_model(extractor, RATIO, None, device=device)
    chunk = model.backbone_chunk or 8
    images = images.to(device)
    return [("eager, 8 images per call", extractor.eval(), images, 8),
            (f"BatchNorm folded, channels-last, {chunk} images per call", model.inference_copy,
             images.contiguous(memory_format=torch.channels_last), chunk)]


@torch.no_grad()
def time_forward(network, inputs: torch.Tensor, per_call: int, embedder: PatchEmbedder | None = None) -> dict:
    """One pass over ``inputs`` (after a warm-up call), optionally with the patch embedding."""
    def step(batch: torch.Tensor) -> None:
        layers = network(batch)
        if embedder is not None:
            embedder(layers)

    step(inputs[:per_call])  # warm-up (and the embedder's pooling matrices)
    with measured() as m:
        for start in range(0, len(inputs), per_call):
            step(inputs[start : start + per_call])
    return m


def bench_backbone(rec: Recorder, extractor, images: torch.Tensor, device: torch.device) -> None:
    """The backbone alone and with each aggregation's patch embedding, images preloaded."""
    for name, network, inputs, per_call in forward_variants(extractor, images, device):
        m = time_forward(network, inputs, per_call)
        rec.emit("backbone_only", len(inputs), None, None, m["seconds"], len(inputs), m["peak_rss_mb"],
                 variant=f"backbone forward ({name})", **gpu_peak(m))
        for aggregation in ("official", "channel_mean"):
            m = time_forward(network, inputs, per_call, PatchEmbedder(aggregation=aggregation))
            rec.emit("backbone_only", len(inputs), 1024, None, m["seconds"], len(inputs), m["peak_rss_mb"],
                     variant=f"backbone + patch embedding ({name})", aggregation=aggregation, **gpu_peak(m))


def fit_line(rec: Recorder, stage: str, model: PatchCore, report, m: dict, ratio: float, **extra) -> dict:
    buffer_mb = model.fit_info.get("buffer_bytes", 0) / 2**20
    model_mb = model_bytes(model) / 2**20
    grown = m["peak_rss_mb"] - m["rss_before_mb"]
    extract_s, coreset_s = report.timings_s["extract"], report.timings_s["coreset"]
    return rec.emit(stage, report.n_images, model.bank.dim, ratio, extract_s + coreset_s,
                    report.n_images, m["peak_rss_mb"], n_patches=report.n_patches, bank_size=report.bank_size,
                    extract_s=round(extract_s, 3), coreset_s=round(coreset_s, 3),
                    buffer_mb=round(buffer_mb, 1), model_mb=round(model_mb, 1),
                    rss_growth_mb=round(grown, 1),
                    rss_growth_over_buffer_and_model=round(grown / (buffer_mb + model_mb), 3),
                    cached=model.fit_info.get("cached"), spilled=model.fit_info.get("spilled"),
                    **gpu_peak(m), **extra)


def fitted(model: PatchCore, train: DataLoader) -> tuple:
    """``(report, measurement)`` of one ``fit``."""
    with measured() as m:
        report = model.fit(train)
    return report, m


def bench_fit(rec: Recorder, work: Workload, extractor, train: DataLoader, aggregation: str) -> tuple:
    """Cold fit (the feature cache empty: extraction + coreset at 10%), then a warm one at 5% from the
    cache. Returns the cold model and its report."""
    model = new_model(extractor, RATIO, work.cache(aggregation), aggregation, work.device)
    report, m = fitted(model, train)
    rec.emit("extract", report.n_images, model.bank.dim, None, report.timings_s["extract"], report.n_images,
             m["peak_rss_mb"], n_patches=report.n_patches,
             variant="data loading + backbone + embedding into the buffer", aggregation=aggregation, **gpu_peak(m))
    fit_line(rec, "fit", model, report, m, RATIO, study="images", variant="cold, features streamed to the cache",
             aggregation=aggregation)
    warm = new_model(extractor, RATIO / 2, work.cache(aggregation), aggregation, work.device)
    warm_report, m = fitted(warm, train)
    fit_line(rec, "fit_warm_cache", warm, warm_report, m, RATIO / 2,
             cold_fit_s=round(sum(report.timings_s.values()), 3), aggregation=aggregation)
    return model, report


def large_fit(rec: Recorder, extractor, root: Path, plan: dict, images: int = 5000, ratio: float = 0.001) -> None:
    """The issue's 5,000 training images at 224 px, float32 buffer in memory (15 GiB): the peak RSS is what
    must fit in 24 GiB. The workload's images are repeated to that count (the memory does not depend on
    their content) and the coreset is kept small (its projection, not its size, is what takes memory)."""
    train, _ = loaders(textures(root, plan["images"]), extractor)
    copies = -(-images // len(train.dataset))
    repeated = torch.utils.data.Subset(torch.utils.data.ConcatDataset([train.dataset] * copies), range(images))
    loader = DataLoader(repeated, batch_size=train.batch_size, num_workers=0)
    model = new_model(extractor, ratio, None)
    report, m = fitted(model, loader)
    fit_line(rec, "fit", model, report, m, ratio, study="large", variant="float32 buffer in memory, 5,000 images",
             peak_rss_gib=round(m["peak_rss_mb"] / 1024, 2))
