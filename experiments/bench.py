"""Performance benchmark: ``make bench`` (full, ~15-20 min on 2 busy cores) or ``make bench BENCH_ARGS=--quick``.

A fixed, seeded workload: the embedded textures generator makes ``--images`` nominal training
images of one category (411 by default, like the measured starting point: 322k patches of
EfficientNet-Lite0 features, 1024-d, at 224 px) plus its test set, on first use, under
``outputs/bench/``. Every measurement is one JSON line on stdout with the keys ``stage``
(extract, coreset, coreset_reference, search, predict, fit, fit_warm_cache, backbone_only),
``n``, ``dim``, ``ratio``, ``seconds``, ``items_per_s``, ``peak_rss_mb`` and, where they
apply, ``variant``, ``threads``, quality figures (recall, max_abs_diff, image_auroc, ...)
and ``study`` for the scaling runs. A markdown table of the same lines goes to stderr and to
``outputs/bench/table.md`` (``--out``), the lines to ``outputs/bench/results.jsonl``.

Peak RSS is the process's high-water mark over that measurement only (reset through
/proc/self/clear_refs on Linux; the lifetime peak elsewhere).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from core.backbones import EfficientNetLite
from core.coreset import (
    GreedyCoresetSampler,
    coreset_size,
    greedy_coreset,
    plain_loop,
    project,
    random_projection,
    starting_state,
)
from core.data import TexturesLayout
from core.detector import collect_predictions
from core.features import PatchEmbedder
from core.patchcore import PatchCore
from core.search import FaissSearch, MemoryBank, PrunedSearch, ReferenceSearch, SearchOptions, SpanSearch
from core.storage import StorageOptions
from experiments.runs.results import peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
STAGES = ("extract", "coreset", "coreset_reference", "search", "predict", "fit", "fit_warm_cache", "backbone_only")
FULL = {"images": 411, "scale_images": (103, 206), "ratio_images": 206, "ratios": (0.01, 0.25),
        "size_images": 103, "sizes": (160, 288), "reference_steps": 200, "radius_images": 40,
        "slow_queries_images": 8}
QUICK = {"images": 40, "scale_images": (10, 20), "ratio_images": 20, "ratios": (0.01, 0.25),
         "size_images": 10, "sizes": (160, 288), "reference_steps": 50, "radius_images": 10,
         "slow_queries_images": 2}
CATEGORY = "grass"
RATIO = 0.1


# ------------------------------------------------------------------------------------ measuring
class Recorder:
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


@contextmanager
def measured():
    """Yields a dict that gets ``seconds``, ``peak_rss_mb`` (this block's high-water mark) and ``rss_before_mb``."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    except OSError:
        pass
    result = {"rss_before_mb": rss_mb()}
    start = time.perf_counter()
    yield result
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = _status_mb("VmHWM") or rss_mb()


# ------------------------------------------------------------------------------------ workload
def textures(root: Path, images: int, image_size: int = 224, train_limit: int | None = None) -> TexturesLayout:
    dataset = TexturesLayout(root=root / f"textures-{images}", categories=[CATEGORY], n_train=images,
                              resize=round(image_size * 256 / 224), image_size=image_size, train_limit=train_limit)
    dataset.ensure()  # generates the images on first use
    return dataset


def loaders(dataset: TexturesLayout, extractor, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    preprocessing = dataset.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
    train = DataLoader(dataset.train_set(CATEGORY, preprocessing), batch_size=batch_size, num_workers=0)
    test = DataLoader(dataset.test_set(CATEGORY, preprocessing), batch_size=batch_size, num_workers=0)
    return train, test


def model_bytes(model: PatchCore) -> int:
    params = sum(p.numel() * p.element_size() for p in model.extractor.parameters())
    return params + model.bank.features.numel() * 4


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
                    cached=model.fit_info.get("cached"), spilled=model.fit_info.get("spilled"), **extra)


def new_model(extractor, ratio: float, cache: Path | None, **storage) -> PatchCore:
    options = StorageOptions(cache_dir=None if cache is None else str(cache), **storage)
    return PatchCore(extractor, PatchEmbedder(), GreedyCoresetSampler(ratio=ratio, seed=0), search=SearchOptions(),
                     storage=options, progress=False)


def bank_with(features: torch.Tensor, strategy=None) -> MemoryBank:
    """A bank of ``features`` searched by ``strategy`` (None: the one ``choose_strategy`` picks)."""
    return MemoryBank().build(features, strategy)


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


def predict_line(rec: Recorder, model: PatchCore, test: DataLoader, variant: str, reference=None,
                 ratio: float | None = None, workers: int | None = None, repeats: int = 1, **extra) -> tuple:
    """One ``predict`` line; with ``repeats > 1`` the median run (this machine is shared), all runs listed."""
    runs = []
    for _ in range(repeats):
        with measured() as m:
            predictions = (model.predict(test) if workers is None
                           else collect_predictions(model.score, test, progress=False, workers=workers))
        runs.append(m)
    m = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    if repeats > 1:
        extra["seconds_runs"] = [round(r["seconds"], 3) for r in runs]
    auroc = float(roc_auc_score(predictions.labels, predictions.image_scores))
    quality = {"image_auroc": round(auroc, 4)}
    if reference is not None:
        quality["auroc_diff"] = round(auroc - reference[0], 4)
        quality["max_abs_map_diff"] = float(np.abs(predictions.maps - reference[1]).max())
        quality["max_abs_score_diff"] = float(np.abs(predictions.image_scores - reference[2]).max())
    rec.emit("predict", len(predictions.image_scores), model.bank.dim, ratio, m["seconds"],
             len(predictions.image_scores), m["peak_rss_mb"], variant=variant, bank_size=len(model.bank),
             search_dim=model.bank.search_dim, **quality, **extra)
    return auroc, predictions.maps, predictions.image_scores


# ------------------------------------------------------------------------------------ stages
def bench_backbone(rec: Recorder, extractor, dataset: TexturesLayout) -> None:
    """The backbone alone and with the patch embedding, images preloaded: as the reference implementations
    run it (eager, 8 images per call) and as PatchCore does (its ``inference_copy``, channels-last, its
    ``backbone_chunk`` images per call)."""
    preprocessing = dataset.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
    train = dataset.train_set(CATEGORY, preprocessing)
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    embedder = PatchEmbedder()
    model = new_model(extractor, RATIO, None)
    fast, chunk = model.inference_copy, model.backbone_chunk
    variants = (("eager, 8 images per call", extractor.eval(), images, 8),
                (f"BatchNorm folded, channels-last, {chunk} images per call", fast,
                 images.contiguous(memory_format=torch.channels_last), chunk))
    with torch.no_grad():
        for name, model, inputs, per_call in variants:
            model(inputs[:per_call])  # warm-up
            with measured() as m:
                for start in range(0, len(inputs), per_call):
                    model(inputs[start : start + per_call])
            rec.emit("backbone_only", len(inputs), None, None, m["seconds"], len(inputs), m["peak_rss_mb"],
                     variant=f"backbone forward ({name})")
            with measured() as m:
                for start in range(0, len(inputs), per_call):
                    embedder(model(inputs[start : start + per_call]))
            rec.emit("backbone_only", len(inputs), 1024, None, m["seconds"], len(inputs), m["peak_rss_mb"],
                     variant=f"backbone + patch embedding ({name})")


def coverage_radius(points: torch.Tensor, chosen: torch.Tensor, chunk: int = 8192) -> float:
    centres = points[chosen]
    centre_norms = (centres * centres).sum(dim=1)
    worst = 0.0
    for start in range(0, len(points), chunk):
        block = points[start : start + chunk]
        squared = torch.addmm(centre_norms, block, centres.T, alpha=-2.0) + (block * block).sum(dim=1, keepdim=True)
        worst = max(worst, float(squared.min(dim=1).values.max()))
    return max(worst, 0.0) ** 0.5


def reference_timing(rec: Recorder, features: torch.Tensor, steps: int) -> None:
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
             steps_per_s=round(min(steps, size) / loop_s, 1), measured_s=round(setup_s + loop_s, 2))
    del points, norms, min_distances


def radius_comparison(rec: Recorder, features: torch.Tensor) -> None:
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
             timings["plain"]["peak_rss_mb"], variant="plain loop, full run", coverage_radius=round(radius["plain"], 4))
    rec.emit("coreset", num, features.shape[1], RATIO, timings["fast"]["seconds"], num, timings["fast"]["peak_rss_mb"],
             variant="fast (batched + bounds), full run", coverage_radius=round(radius["fast"], 4),
             radius_over_reference=round(radius["fast"] / radius["plain"], 5), same_order=round(same, 5),
             same_set=round(same_set, 5), speedup=round(timings["plain"]["seconds"] / timings["fast"]["seconds"], 2))


def bench_search(rec: Recorder, bank_features: torch.Tensor, queries: torch.Tensor, per_image: int,
                 slow_queries: int, full: bool = False) -> None:
    """Every backend against float64 brute force on a subset of the queries (recall@1, largest distance error)."""
    subset = torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[:2000]
    truth = torch.cat([torch.cdist(queries[subset[i : i + 500]].double(), bank_features.double()).min(dim=1).values
                       for i in range(0, len(subset), 500)])
    exact_index = bank_with(bank_features).search(queries[subset], k=1)[1][:, 0]

    def run(name: str, bank: MemoryBank, limit: int | None = None, repeats: int = 3, **extra) -> None:
        q = queries if limit is None else queries[:limit]
        bank.search(q[:per_image])  # warm-up (numba/faiss/openmp start, caches)
        runs = []
        for _ in range(repeats):  # the median of a few: this machine is shared
            with measured() as m:
                bank.search(q, k=1)
            runs.append(m)
        m = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        extra["seconds_runs"] = [round(r["seconds"], 3) for r in runs]
        distances, indices = bank.search(queries[subset], k=1)
        quality = {"recall_at_1": round(float((indices[:, 0] == exact_index).float().mean()), 4),
                   "max_abs_err_vs_float64": float((distances[:, 0].double() - truth).abs().max())}
        rec.emit("search", len(q), bank_features.shape[1], None, m["seconds"], len(q), m["peak_rss_mb"],
                 variant=name, bank_size=len(bank), search_dim=bank.search_dim,
                 images_per_s=round(len(q) / per_image / m["seconds"], 2), **quality, **extra)

    run("exact, all dimensions, every distance (the starting point's search)",
        bank_with(bank_features, ReferenceSearch()), limit=slow_queries, repeats=1)
    run("exact, bank span, every distance", bank_with(bank_features, SpanSearch()))
    default = bank_with(bank_features)
    run("exact (default: bank span + bound pruning)", default)
    threads = torch.get_num_threads()
    for count in sorted({1, 2} - {threads}):
        torch.set_num_threads(count)
        try:
            run("exact (default: bank span + bound pruning)", default)
        finally:
            torch.set_num_threads(threads)
    if full and default.strategy.name == "pruned":  # fewer or more queries per block, with the bound's
        defaults = PrunedSearch()                     # product in the same cache-sized chunks
        for queries_per_block in (128, 512):
            chunk_rows = defaults.query_block * defaults.chunk_rows // queries_per_block
            run("exact (default: bank span + bound pruning)",
                bank_with(bank_features, PrunedSearch(query_block=queries_per_block, chunk_rows=chunk_rows)),
                query_block=queries_per_block)
    try:
        import faiss  # noqa: F401
    except ImportError:
        return
    run("faiss flat (bank span)", bank_with(bank_features, FaissSearch("flat")))
    for nprobe in (4, 16, 64) if full else (16, 64):
        bank = bank_with(bank_features, FaissSearch("ivf", nprobe=nprobe))
        run(f"faiss ivf nprobe={nprobe}", bank, nlist=bank.strategy.nlist, nprobe=nprobe)


def test_queries(model: PatchCore, test: DataLoader) -> torch.Tensor:
    parts = []
    with torch.no_grad():
        for batch in test:
            features, _ = model.embed(batch["image"])
            parts.append(features.reshape(-1, features.shape[-1]))
    return torch.cat(parts)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images instead of 411 (~1-2 min)")
    parser.add_argument("--images", type=int, help="training images (default 411, quick 40)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "bench", help="data, cache and results")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: scaling reference search")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="'all': also block sizes, ivf nprobe=4 and 64 predict; 'large': a 5,000-image fit "
                             "with the float32 buffer in memory (needs ~19 GiB free, ~3 min)")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.images:
        plan["images"] = args.images
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rec = Recorder(args.root)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "plan": plan}),
          file=sys.stderr, flush=True)
    cache = args.root / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    extractor = EfficientNetLite().eval()
    dataset = textures(args.root, plan["images"])
    train, test = loaders(dataset, extractor)
    bench_backbone(rec, extractor, dataset)

    # fit, cold (the feature cache is empty): extraction + coreset at 10%
    model = new_model(extractor, RATIO, cache)
    with measured() as m:
        report = model.fit(train)
    rec.emit("extract", report.n_images, model.bank.dim, None, report.timings_s["extract"], report.n_images,
             m["peak_rss_mb"], n_patches=report.n_patches,
             variant="data loading + backbone + embedding into the buffer")
    fit_line(rec, "fit", model, report, m, RATIO, study="images", variant="cold, features streamed to the cache")

    # fit again with another ratio: the features come from the cache
    warm = new_model(extractor, RATIO / 2, cache)
    with measured() as m:
        warm_report = warm.fit(train)
    fit_line(rec, "fit_warm_cache", warm, warm_report, m, RATIO / 2,
             cold_fit_s=round(sum(report.timings_s.values()), 3))
    del warm

    # the coreset alone on the cached features, in memory
    features = model_features(cache)
    with measured() as m:
        chosen = greedy_coreset(features, RATIO, seed=0, progress=False)
    rec.emit("coreset", len(features), features.shape[1], RATIO, m["seconds"], len(features), m["peak_rss_mb"],
             variant="fast (default)", bank_size=len(chosen))
    if "reference" not in args.skip:
        reference_timing(rec, features, plan["reference_steps"])
        radius_images = min(plan["radius_images"], report.n_images)
        radius_comparison(rec, features[: radius_images * (len(features) // report.n_images)])

    # search and predict against the 10% bank
    bank_features = features[chosen]
    del features
    queries = test_queries(model, test)
    per_image = queries.shape[0] // len(test.dataset)
    if "search" not in args.skip:
        bench_search(rec, bank_features, queries, per_image, plan["slow_queries_images"] * per_image,
                     full="all" in args.extra)
    with starting_point_pipeline(model, extractor):  # the two published implementations, re-run here
        model.bank = bank_with(bank_features, ReferenceSearch())
        reference = predict_line(rec, model, test, "starting point (official-style): eager backbone, every "
                                 "distance in all 1024 dimensions", workers=1)
        model.bank = bank_with(bank_features, SpanSearch())
        predict_line(rec, model, test, "starting point (anomalib-style): eager backbone, every distance in the "
                     "bank's span (152-d here, like anomalib's concatenated features)", reference, workers=1)
    predict_line(rec, model, test, "fast backbone, every distance in the bank span", reference)
    model.bank = bank_with(bank_features)
    model.predict(test)  # warm-up: numba's compiled kernels, the embedder's projection
    predict_line(rec, model, test, "exact (default: bank span + bound pruning)", reference, repeats=5)
    threads = torch.get_num_threads()
    for count in sorted({1, 2} - {threads}):
        torch.set_num_threads(count)
        predict_line(rec, model, test, "exact (default: bank span + bound pruning)", reference, repeats=3)
        torch.set_num_threads(threads)
    try:
        import faiss  # noqa: F401

        for nprobe in (16, 64) if "all" in args.extra else (16,):
            model.bank = bank_with(bank_features, FaissSearch("ivf", nprobe=nprobe))
            predict_line(rec, model, test, f"faiss ivf nprobe={nprobe}", reference)
    except ImportError:
        pass
    del model, bank_features

    if "scaling" not in args.skip:
        scaling(rec, extractor, args.root, cache, plan)
    if "large" in args.extra:
        large_fit(rec, extractor, args.root, plan)
    table = markdown_table(rec.lines)
    print(table, file=sys.stderr)
    (args.root / "table.md").write_text(table + "\n")
    return 0


def model_features(cache: Path) -> torch.Tensor:
    """The first cache entry's features (an .npy file): the cold fit's training features."""
    files = sorted(cache.glob("*.npy"), key=lambda p: p.stat().st_mtime)
    return torch.from_numpy(np.load(files[0])).float()


def scaling(rec: Recorder, extractor, root: Path, cache: Path, plan: dict) -> None:
    """Cost vs training images, bank ratio and image size, three sizes each (the 411-image run is one of them);
    plus the fit buffer variants (float16, spilled to disk) and their peak RSS."""
    middle = plan["ratio_images"]
    for images in plan["scale_images"]:  # seeded subsets of the same images, buffer in memory, no cache
        train, test = loaders(textures(root, plan["images"], train_limit=images), extractor)
        model = new_model(extractor, RATIO, None)
        with measured() as m:
            report = model.fit(train)
        fit_line(rec, "fit", model, report, m, RATIO, study="images", variant="float32 buffer in memory")
        predict_line(rec, model, test, "exact (default)", study="images", train_images=images)
        if images != middle:
            continue
        in_memory = model.bank.features
        for variant, options in (("float16 buffer in memory", {"dtype": "float16"}),
                                 ("float32 buffer spilled to disk", {"spill_dir": str(root / "spill")})):
            model = new_model(extractor, RATIO, None, **options)
            with measured() as m:
                report = model.fit(train)
            fit_line(rec, "fit", model, report, m, RATIO, study="buffer", variant=variant,
                     bank_equal_to_in_memory=bool(torch.equal(model.bank.features, in_memory)))
            predict_line(rec, model, test, "exact (default)", study="buffer", buffer=variant)
    train, test = loaders(textures(root, plan["images"], train_limit=middle), extractor)
    for number, ratio in enumerate(plan["ratios"]):  # the first fills the cache, the others read it
        model = new_model(extractor, ratio, cache)
        with measured() as m:
            report = model.fit(train)
        fit_line(rec, "fit" if number == 0 else "fit_warm_cache", model, report, m, ratio, study="ratio")
        predict_line(rec, model, test, "exact (default)", study="ratio", ratio=ratio,
                     train_images=middle)
    for size in plan["sizes"]:
        train, test = loaders(textures(root, plan["images"], image_size=size, train_limit=plan["size_images"]),
                              extractor)
        model = new_model(extractor, RATIO, None)
        with measured() as m:
            report = model.fit(train)
        fit_line(rec, "fit", model, report, m, RATIO, study="image_size", image_size=size)
        predict_line(rec, model, test, "exact (default)", study="image_size", image_size=size,
                     train_images=plan["size_images"])


def large_fit(rec: Recorder, extractor, root: Path, plan: dict, images: int = 5000, ratio: float = 0.001) -> None:
    """The issue's 5,000 training images at 224 px, float32 buffer in memory (15 GiB): the peak RSS is what
    must fit in 24 GiB. The workload's images are repeated to that count (the memory does not depend on
    their content) and the coreset is kept small (its projection, not its size, is what takes memory)."""
    train, _ = loaders(textures(root, plan["images"]), extractor)
    copies = -(-images // len(train.dataset))
    repeated = torch.utils.data.Subset(torch.utils.data.ConcatDataset([train.dataset] * copies), range(images))
    loader = DataLoader(repeated, batch_size=train.batch_size, num_workers=0)
    model = new_model(extractor, ratio, None)
    with measured() as m:
        report = model.fit(loader)
    fit_line(rec, "fit", model, report, m, ratio, study="large", variant="float32 buffer in memory, 5,000 images",
             peak_rss_gib=round(m["peak_rss_mb"] / 1024, 2))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(lines: list[dict]) -> str:
    head = ("| stage | variant / study | n | ratio | seconds | items/s | peak RSS MB | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---|")
    rows = []
    skip = {"stage", "variant", "n", "ratio", "seconds", "items_per_s", "peak_rss_mb", "dim", "study", "seconds_runs"}
    for line in lines:
        notes = ", ".join(f"{k}={_short(v)}" for k, v in line.items() if k not in skip and v is not None)
        label = line.get("variant") or (f"study: {line['study']}" if line.get("study") else "")
        rows.append(f"| {line['stage']} | {label} | {line['n']} | {line['ratio'] if line['ratio'] is not None else ''} "
                    f"| {line['seconds']} | {line['items_per_s']} | {line['peak_rss_mb']} | {notes} |")
    return "\n".join([head, *rows])


if __name__ == "__main__":
    sys.exit(main())
