"""Where prediction's time goes on real images, and one alternative measured beside it (docs/performance.md,
"On real images"): ``python -m experiments.benchmarks.real_search elpv:mono [--train-limit 200] [--ratio 0.1]``.

One thread, the default model fitted on the workload (experiments/benchmarks/real_images.py). Prints JSON lines:
per image stage, default vs official-style (eager backbone, every distance in all dimensions), the seconds of the
patch features (backbone + embedding) and of the scoring (search + maps) for 64 test images; the bank's spectrum
(principal axes for 50-99 % of its variance); per bound width, the share of pairs a bound leaves to refine with
the perfect limit and with the seed rows' limit (the patches of 24 test images as queries); and interleaved
timings of the default search, its bound products alone, the plain matrix product, and a first pass that seeds
each query's limit from its best candidate under a narrow bound (tried, not adopted). Counts do not depend on the
machine's load; timings are single runs, so read their ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from core.linalg import TOL
from core.search import ReferenceSearch, pruned
from experiments.benchmarks.prediction import starting_point_pipeline
from experiments.benchmarks.real_images import fitted_default
from experiments.benchmarks.workload import bank_with

QUERY_IMAGES = 24


def stage_seconds(model, batches: list[torch.Tensor]) -> dict:
    """Seconds of the patch features (backbone + embedding) and of the scoring (search + maps) over ``batches``."""
    features_s = scoring_s = 0.0
    for images in batches:
        start = time.perf_counter()
        features, grid = model.embed(images)
        middle = time.perf_counter()
        model.scoring.score(features, model.bank, grid, tuple(images.shape[-2:]))
        features_s, scoring_s = features_s + middle - start, scoring_s + time.perf_counter() - middle
    return {"features_s": round(features_s, 3), "scoring_s": round(scoring_s, 3)}


def stages(model, extractor, test) -> None:
    """Default vs official-style, per stage, on the first 64 test images (interleaved twice)."""
    batches = [b["image"] for b in DataLoader(Subset(test, list(range(min(64, len(test))))), batch_size=8)]
    features = model.bank.features.clone()
    model.bank = bank_with(features)
    stage_seconds(model, batches[:1])  # warm-up: compiled kernels
    for repeat in range(2):
        model.bank = bank_with(features)
        default = stage_seconds(model, batches)
        with starting_point_pipeline(model, extractor):
            model.bank = bank_with(features, ReferenceSearch())
            official = stage_seconds(model, batches)
        print(json.dumps({"repeat": repeat, "images": sum(len(b) for b in batches), "bank": len(features),
                          "default": default, "official_style": official}), flush=True)
    model.bank = bank_with(features)


def workload(model, test) -> tuple[pruned.PrunedSearch, torch.Tensor, torch.Tensor]:
    """The model's search strategy, the patches of 24 test images, and the same in its frame."""
    picked = Subset(test, list(range(0, len(test), max(1, len(test) // QUERY_IMAGES)))[:QUERY_IMAGES])
    with torch.no_grad():
        parts = [model.embed(batch["image"])[0] for batch in DataLoader(picked, batch_size=8)]
    queries = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
    strategy = model.bank.strategy
    if not isinstance(strategy, pruned.PrunedSearch):
        raise SystemExit(f"the bank is searched by {strategy.name}, not the pruned search: nothing to measure")
    return strategy, queries, strategy.frame.queries(queries)[0].contiguous()


def nearest_squared(coords: torch.Tensor, bank: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Each query's smallest squared distance to the first ``rows`` bank rows (all: the truth)."""
    bank = bank[:rows]
    norms = (bank * bank).sum(1)
    return torch.cat([((c * c).sum(1)[:, None] + norms[None] - 2 * c @ bank.T).min(1).values.clamp_min(0)
                      for c in coords.split(1024)])


def refine_shares(coords: torch.Tensor, bank: torch.Tensor, limit: torch.Tensor, width: int) -> float:
    """The mean share of bank rows whose width-column bound is below each query's ``limit``."""
    bank_columns, query_columns = pruned._bound_columns(bank, width), pruned._bound_columns(coords, width)
    bank_norms, query_norms = (bank * bank).sum(1), (coords * coords).sum(1)
    shares = [((query_norms[s:s + 1024, None] + bank_norms[None] - 2 * query_columns[s:s + 1024] @ bank_columns.T)
               < limit[s:s + 1024, None]).float().mean(1) for s in range(0, len(coords), 1024)]
    return float(torch.cat(shares).mean())


def streamed(strategy: pruned.PrunedSearch, coords: torch.Tensor, narrow: int | None) -> tuple[dict, np.ndarray,
                                                                                              np.ndarray]:
    """The default search's loop, one thread, k = 1 (``narrow``: seed every limit by a first pass instead): its
    counts and time, each query's squared distance found and whether it gave up (left to the matrix product)."""
    columns, bank_norms, bank = strategy.columns, strategy.bank_norms, strategy.frame.coords
    query_columns = pruned._bound_columns(coords, columns.shape[1])
    query_norms = (coords * coords).sum(1).numpy()
    squared = np.full((len(coords), 1), np.inf, dtype=np.float32)
    indices = np.full((len(coords), 1), -1, dtype=np.int64)
    evaluated = np.zeros(len(coords), dtype=np.int64)
    rows, cap = len(columns), max(64, int(strategy.give_up * len(columns)))
    queries, bank_np = coords.numpy(), bank.numpy()
    start_time = time.perf_counter()
    seed_rows = 0 if narrow else min(strategy.seed_rows, rows)
    if narrow:  # the first pass: each query's best under a narrow bound, its exact distance
        narrow_bank, narrow_queries = pruned._bound_columns(bank, narrow), pruned._bound_columns(coords, narrow)
        for s in range(0, len(coords), strategy.query_block):
            dots = torch.mm(narrow_bank, narrow_queries[s:s + strategy.query_block].T.contiguous()).numpy()
            pruned._seed(dots, bank_norms, queries[s:s + strategy.query_block], bank_np,
                         squared[s:s + strategy.query_block], indices[s:s + strategy.query_block])
    chunks = ([(0, seed_rows)] if seed_rows else []) + [
        (r, min(r + strategy.chunk_rows, rows)) for r in range(seed_rows, rows, strategy.chunk_rows)]
    for s in range(0, len(coords), strategy.query_block):
        e = min(s + strategy.query_block, len(coords))
        block = (query_norms[s:e], queries[s:e], bank_np, squared[s:e], indices[s:e])
        limit = squared[s:e, 0] * (1 + TOL) - query_norms[s:e] * (1 - TOL)
        transposed = query_columns[s:e].T.contiguous()
        for first, last in chunks:
            dots = torch.mm(columns[first:last], transposed).numpy()
            if first == 0 and seed_rows:
                pruned._seed(dots, bank_norms, *block[1:])
                limit[:] = squared[s:e, 0] * (1 + TOL) - query_norms[s:e] * (1 - TOL)
            pruned._refine(dots, bank_norms, first, *block, limit, evaluated[s:e], cap, TOL)
    hard = evaluated > cap
    return {"seconds": round(time.perf_counter() - start_time, 3),
            "evaluated_mean": round(float(evaluated[~hard].mean()), 1),
            "evaluated_median": float(np.median(evaluated[~hard])), "gave_up": round(float(hard.mean()), 4)}, \
        squared[:, 0], hard


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="elpv:mono, elpv:poly or <folder>:<category>")
    parser.add_argument("--train-limit", type=int, default=200, help="training images (0: all)")
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, extractor, _, test = fitted_default(args.spec, args.train_limit or None, args.ratio)
    stages(model, extractor, test)
    strategy, queries, coords = workload(model, test)
    bank = strategy.frame.coords
    variance = bank.var(0)
    share = variance.cumsum(0) / variance.sum()
    print(json.dumps({"bank": list(bank.shape), "queries": len(coords), "bound_width": strategy.columns.shape[1],
                      "axes_for": {str(p): int((share < p).sum()) + 1 for p in (0.5, 0.9, 0.99)}}), flush=True)
    truth, seeded = nearest_squared(coords, bank), nearest_squared(coords, bank, strategy.seed_rows)
    for width in (48, 128, 256, 512):
        print(json.dumps({"width": width, "refine_share_perfect_limit": refine_shares(coords, bank, truth, width),
                          "refine_share_seed_limit": refine_shares(coords, bank, seeded, width)}), flush=True)
    for repeat in range(2):  # interleaved: the machine is shared
        begin = time.perf_counter()
        strategy.search(queries, 1)
        plain = time.perf_counter()
        nearest_squared(coords, bank)
        products = time.perf_counter()
        query_columns = pruned._bound_columns(coords, strategy.columns.shape[1])
        for s in range(0, len(coords), strategy.query_block):
            transposed = query_columns[s:s + strategy.query_block].T.contiguous()
            for first in range(0, len(strategy.columns), strategy.chunk_rows):
                torch.mm(strategy.columns[first:first + strategy.chunk_rows], transposed)
        lines = {"repeat": repeat, "default_search_s": round(plain - begin, 3),
                 "plain_product_s": round(products - plain, 3),
                 "bound_products_s": round(time.perf_counter() - products, 3),
                 "streamed_default": streamed(strategy, coords, None)[0]}
        lines.update({f"first_pass_{narrow}": streamed(strategy, coords, narrow)[0] for narrow in (8, 16, 32)})
        print(json.dumps(lines), flush=True)


if __name__ == "__main__":
    main()
