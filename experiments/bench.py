"""Performance benchmark: ``make bench`` (full, ~60 min on 2 idle cores; docs/performance.md),
``make bench BENCH_ARGS=--quick``, ``make bench DEVICE=cuda`` (the same workload on the GPU).

A fixed, seeded workload: the embedded textures generator makes ``--images`` nominal training
images of one category (411 by default, like the measured starting point: 322k patches of
EfficientNet-Lite0 features, 1024-d, at 224 px) plus its test set, on first use, under
``outputs/bench/``. The fit, coreset, search and prediction measurements run for both patch
aggregations (``official`` with squared distances, the default; ``channel_mean`` with Euclidean
ones), next to the official-style and anomalib-style starting points; WRN50 (random seeded
weights) prediction is measured against its backbone alone; the official model's prediction also through its
exported model under ONNX Runtime and OpenVINO, single graph and fast form, float32 and INT8 feature graph, for
EfficientNet-Lite0 and WRN50 (experiments/benchmarks/export_speed.py; ``--skip export``). A full run also
measures the default prediction against the official-style pipeline on real images, ELPV mono and poly
(experiments/benchmarks/real_images.py; ``--real`` for other folders, ``--skip real`` to leave them out; a
``--quick`` run leaves them out unless ``--real`` names some).
Every measurement is one JSON line on
stdout with the keys ``stage`` (extract, coreset, coreset_reference, search, predict, fit,
fit_warm_cache, backbone_only, evaluate: the pixel metrics of the textures test maps), ``n``, ``dim``, ``ratio``,
``seconds``, ``items_per_s``,
``peak_rss_mb`` and, where they apply, ``variant``, ``aggregation``, ``threads``, quality figures
(recall, max_abs_diff, image_auroc, ...), ``study`` for the scaling runs and ``peak_gpu_mb`` on a
GPU. A markdown table of the same lines, then the issue's goal ratios, goes to stderr and to
``outputs/bench/table.md`` (``--root``), the lines to ``outputs/bench/results.jsonl``.

Peak RSS is the process's high-water mark over that measurement only (reset through
/proc/self/clear_refs on Linux; the lifetime peak elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from core.backbones import EfficientNetLite
from core.data import DatasetError
from experiments.benchmarks.coresets import coreset_alone, radius_comparison, reference_timing
from experiments.benchmarks.export_speed import bench_exported
from experiments.benchmarks.fitting import bench_backbone, bench_fit, large_fit
from experiments.benchmarks.prediction import bench_predictions, bench_wrn50
from experiments.benchmarks.real_images import RealWorkloadError, bench_real, real_dataset
from experiments.benchmarks.recording import Recorder
from experiments.benchmarks.scaling import scaling
from experiments.benchmarks.searches import bench_search
from experiments.benchmarks.table import goals, goals_table, markdown_table
from experiments.benchmarks.workload import (
    AGGREGATIONS,
    FULL,
    QUICK,
    Workload,
    bank_with,
    loaders,
    model_features,
    preloaded,
    test_queries,
    textures,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = ("elpv:mono", "elpv:poly")  # issue 29's goal lines: real defects, installed from PyPI


def real_workloads(args: argparse.Namespace) -> list[str]:
    """The real-image workloads of this run: ``--real``'s, else ELPV mono and poly in a full run."""
    if args.real is not None:
        return list(args.real)
    return [] if args.quick or "real" in args.skip else list(DEFAULT_REAL)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images instead of 411 (~3-4 min)")
    parser.add_argument("--images", type=int, help="training images (default 411, quick 40)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models run")
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "bench", help="data, cache and results")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="parts to skip: textures (the whole textures workload), scaling, reference, search, "
                             "wrn50, export, real (the default real-image workloads)")
    parser.add_argument("--real", nargs="*", default=None,
                        help="real-image workloads beside textures: elpv:mono, elpv:poly or <folder>:<category> "
                             "(MVTec AD layout), each optionally ending in @<coreset ratio> (elpv:poly@0.01); the "
                             f"default prediction against the official-style pipeline on them (default: "
                             f"{' '.join(DEFAULT_REAL)}, none with --quick or --skip real)")
    parser.add_argument("--real-ratio", type=float, default=None,
                        help="the coreset ratio of real workloads without @<ratio> (default: 0.1, the default "
                             "settings')")
    parser.add_argument("--real-train-limit", type=int, default=None,
                        help="at most this many training images of each real workload (default: all)")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="'all': also block sizes, ivf nprobe=4 and 64 predict; 'large': a 5,000-image fit "
                             "with the float32 buffer in memory (needs ~19 GiB free, ~3 min)")
    return parser.parse_args(argv)


def bench_aggregation(rec: Recorder, work: Workload, extractor, train, test, aggregation: str) -> None:
    """Fit, coreset, search and prediction of one aggregation on the full workload."""
    tag = {"aggregation": aggregation}
    model, report = bench_fit(rec, work, extractor, train, aggregation)
    features = model_features(work.cache(aggregation)).to(work.device)  # the cold fit's features
    chosen = coreset_alone(rec, features, **tag)
    if "reference" not in work.skip and work.on_cpu:  # on a GPU the plain loop is the default
        reference_timing(rec, features, work.plan["reference_steps"], **tag)
        radius_images = min(work.plan["radius_images"], report.n_images)
        radius_comparison(rec, features[: radius_images * (len(features) // report.n_images)], **tag)
    bank_features = features[chosen.to(features.device)]
    del features
    queries = test_queries(model, test)
    per_image = queries.shape[0] // len(test.dataset)
    if "search" not in work.skip:
        bench_search(rec, bank_features, queries, per_image, work.plan["slow_queries_images"] * per_image,
                     full="all" in work.extra, threads=work.on_cpu, **tag)
    del queries
    bench_predictions(rec, work, model, extractor, test, bank_features, aggregation)
    if "export" not in work.skip and work.on_cpu and aggregation == "official":  # ONNX Runtime, OpenVINO
        model.bank = bank_with(bank_features)
        bench_exported(rec, model, test, [sample.path for sample in train.dataset.samples], **tag)


def finish(rec: Recorder, root: Path) -> None:
    """The table and the goal ratios, to stderr and ``table.md``; the goals also as JSON lines."""
    found = goals(rec.lines)
    for goal in found:
        print(json.dumps(goal), flush=True)
    text = markdown_table(rec.lines) + "\n\nGoals (ratios of lines of this run):\n\n" + goals_table(found)
    print(text, file=sys.stderr)
    (root / "table.md").write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda (DEVICE=cuda) asked for, but torch sees no CUDA device on this machine "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); nothing was run.", file=sys.stderr)
        return 2
    plan = dict(QUICK if args.quick else FULL)
    if args.images:
        plan["images"] = args.images
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.real = real_workloads(args)
    for spec in args.real:  # a bad --real fails now, not after the textures part
        try:
            real_dataset(spec, args.real_train_limit)
        except (RealWorkloadError, DatasetError) as error:
            print(f"bench: {error}", file=sys.stderr)
            return 2
    work = Workload(args.root, plan, torch.device(args.device), args.skip, args.extra)
    rec = Recorder(args.root)
    gpu = torch.cuda.get_device_name() if work.device.type == "cuda" else None
    print(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
                      "gpu": gpu, "plan": plan}), file=sys.stderr, flush=True)
    shutil.rmtree(args.root / "cache", ignore_errors=True)

    extractor = EfficientNetLite().eval().to(work.device)
    if "textures" not in args.skip:
        dataset = textures(args.root, plan["images"])
        train, test = loaders(dataset, extractor)
        bench_backbone(rec, extractor, preloaded(dataset, extractor), work.device)
        for aggregation in AGGREGATIONS:
            bench_aggregation(rec, work, extractor, train, test, aggregation)
        if "scaling" not in args.skip and work.on_cpu:
            scaling(rec, extractor, args.root, args.root / "cache" / "scaling", plan)
    for spec in args.real:
        bench_real(rec, work, spec, args.real_ratio, args.real_train_limit)
    if "wrn50" not in args.skip:
        bench_wrn50(rec, work)
    if "large" in args.extra and "textures" not in args.skip:
        large_fit(rec, extractor, args.root, plan)
    finish(rec, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
