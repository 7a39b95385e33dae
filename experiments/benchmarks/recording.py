"""One JSON line per measurement, and the block that measures it (seconds, peak RSS, peak GPU memory)."""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from experiments.harness.results import peak_rss_mb

STAGES = ("extract", "coreset", "coreset_reference", "search", "predict", "fit", "fit_warm_cache", "backbone_only",
          "evaluate")


class Recorder:
    """Prints each line to stdout and appends it to ``out/results.jsonl``; keeps them for the table."""

    def __init__(self, out: Path | None) -> None:
        self.lines: list[dict] = []
        self.out = out
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.jsonl").write_text("")

    def emit(self, stage: str, n: int, dim: int | None, ratio: float | None, seconds: float, items: float,
             peak_rss_mb: float | None, **extra) -> dict:
        assert stage in STAGES, stage
        line = {"stage": stage, "n": int(n), "dim": dim, "ratio": ratio, "seconds": round(seconds, 3),
                "items_per_s": round(items / seconds, 2) if seconds > 0 else None,
                "peak_rss_mb": None if peak_rss_mb is None else round(peak_rss_mb, 1),
                "threads": torch.get_num_threads(), **extra}
        print(json.dumps(line), flush=True)
        self.lines.append(line)
        if self.out is not None:
            with open(self.out / "results.jsonl", "a") as handle:
                handle.write(json.dumps(line) + "\n")
        return line


def _status_mb(field: str) -> float | None:
    try:
        for row in Path("/proc/self/status").read_text().splitlines():
            if row.startswith(field + ":"):
                return int(row.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident memory; the lifetime peak where /proc is missing."""
    current = _status_mb("VmRSS")
    return current if current is not None else peak_rss_mb()


def _gpu_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@contextmanager
def measured():
    """Yields a dict that gets ``seconds``, ``peak_rss_mb`` (this block's high-water mark),
    ``rss_before_mb`` and, once CUDA is in use, ``peak_gpu_mb`` (``torch.cuda.max_memory_allocated``
    over the block; the GPU's queue is drained before the clock stops)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    except OSError:
        pass
    gpu = _gpu_in_use()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = {"rss_before_mb": rss_mb()}
    start = time.perf_counter()
    yield result
    if gpu:
        torch.cuda.synchronize()
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = _status_mb("VmHWM") or rss_mb()
    if gpu:
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def gpu_peak(m: dict) -> dict:
    """``{"peak_gpu_mb": ...}`` for a line when its block ran with CUDA in use, else nothing."""
    return {"peak_gpu_mb": m["peak_gpu_mb"]} if "peak_gpu_mb" in m else {}


def median_run(runs: list[dict]) -> dict:
    """The median of repeated measurements (this machine is shared)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def seconds_runs(runs: list[dict]) -> list[float]:
    """Every repeated measurement's seconds, for the line that reports their median (``seconds_runs``)."""
    return [round(r["seconds"], 3) for r in runs]
