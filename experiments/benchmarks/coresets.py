"""The coreset alone: the fast selection on the cold fit's features, the plain loop it replaces
(extrapolated on the full bank, run in full on a smaller one) and their coverage radii."""

from __future__ import annotations

import time

import torch

from core.coreset import coreset_size, greedy_coreset, plain_loop, project, random_projection, starting_state
from experiments.benchmarks.recording import Recorder, gpu_peak, measured
from experiments.benchmarks.workload import RATIO


def coverage_radius(points: torch.Tensor, chosen: torch.Tensor, chunk: int = 8192) -> float:
    """The largest distance of any point to its nearest chosen centre."""
    centres = points[chosen]
    centre_norms = (centres * centres).sum(dim=1)
    worst = 0.0
    for start in range(0, len(points), chunk):
        block = points[start : start + chunk]
        squared = torch.addmm(centre_norms, block, centres.T, alpha=-2.0) + (block * block).sum(dim=1, keepdim=True)
        worst = max(worst, float(squared.min(dim=1).values.max()))
    return max(worst, 0.0) ** 0.5


def coreset_alone(rec: Recorder, features: torch.Tensor, **extra) -> torch.Tensor:
    """The default selection on ``features`` (fast on a CPU, the plain loop on a GPU); returns the indices."""
    with measured() as m:
        chosen = greedy_coreset(features, RATIO, seed=0, progress=False)
    variant = "fast (default)" if features.device.type == "cpu" else "plain loop (default on a GPU)"
    rec.emit("coreset", len(features), features.shape[1], RATIO, m["seconds"], len(features), m["peak_rss_mb"],
             variant=variant, bank_size=len(chosen), **gpu_peak(m), **extra)
    return chosen


def reference_timing(rec: Recorder, features: torch.Tensor, steps: int, **extra) -> None:
    """The plain loop on the full bank for ``steps`` iterations; its total is extrapolated (constant cost/step)."""
    num = len(features)
    size = coreset_size(num, RATIO)
    with measured() as m:
        start = time.perf_counter()
        points, norms, min_distances = starting_state(features, proj_dim=128, start_points=10, seed=0)
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        plain_loop(points, norms, min_distances, min(steps, size), progress=False)
        loop_s = time.perf_counter() - start
    total = setup_s + loop_s * size / min(steps, size)
    rec.emit("coreset_reference", num, features.shape[1], RATIO, total, num, m["peak_rss_mb"],
             variant="plain loop (one pass per centre)", extrapolated_from_steps=min(steps, size),
             steps_per_s=round(min(steps, size) / loop_s, 1), measured_s=round(setup_s + loop_s, 2), **extra)


def radius_comparison(rec: Recorder, features: torch.Tensor, **extra) -> None:
    """Full runs of both on a smaller bank: same selection? coverage radius within 2%?"""
    num = len(features)
    timings, chosen = {}, {}
    for method in ("plain", "fast"):
        with measured() as m:
            chosen[method] = greedy_coreset(features, RATIO, seed=0, progress=False, method=method)
        timings[method] = m
    points = project(features, random_projection(features.shape[1], 128, 0))
    radius = {method: coverage_radius(points, chosen[method]) for method in chosen}
    same = float((chosen["plain"] == chosen["fast"]).float().mean())
    same_set = len(set(chosen["plain"].tolist()) & set(chosen["fast"].tolist())) / len(chosen["plain"])
    rec.emit("coreset_reference", num, features.shape[1], RATIO, timings["plain"]["seconds"], num,
             timings["plain"]["peak_rss_mb"], variant="plain loop, full run",
             coverage_radius=round(radius["plain"], 4), **extra)
    rec.emit("coreset", num, features.shape[1], RATIO, timings["fast"]["seconds"], num, timings["fast"]["peak_rss_mb"],
             variant="fast (batched + bounds), full run", coverage_radius=round(radius["fast"], 4),
             radius_over_reference=round(radius["fast"] / radius["plain"], 5), same_order=round(same, 5),
             same_set=round(same_set, 5), speedup=round(timings["plain"]["seconds"] / timings["fast"]["seconds"], 2),
             **extra)
