"""Every search backend on the same bank and queries, against float64 brute force."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.search import FaissSearch, MemoryBank, PrunedSearch, ReferenceSearch, SpanSearch
from experiments.benchmarks.recording import Recorder, gpu_peak, measured, median_run, seconds_runs
from experiments.benchmarks.workload import bank_with, have_faiss

DEFAULT = "exact (default: bank span + bound pruning)"


@dataclass
class SearchBench:
    """The queries, a 2,000-query subset with its float64 nearest distances and the exact neighbours."""

    rec: Recorder
    bank_features: torch.Tensor
    queries: torch.Tensor
    per_image: int
    extra: dict

    def __post_init__(self) -> None:
        self.subset = torch.randperm(len(self.queries), generator=torch.Generator().manual_seed(0))[:2000]
        chosen = self.queries[self.subset.to(self.queries.device)]
        self.truth = torch.cat([torch.cdist(chosen[i : i + 500].double(), self.bank_features.double()).min(dim=1).values
                                for i in range(0, len(chosen), 500)])
        self.chosen = chosen
        self.exact_index = bank_with(self.bank_features).search(chosen, k=1)[1][:, 0]

    def run(self, name: str, bank: MemoryBank, limit: int | None = None, repeats: int = 3, **extra) -> None:
        """One ``search`` line: the median of ``repeats`` timed searches of all (or ``limit``) queries."""
        q = self.queries if limit is None else self.queries[:limit]
        bank.search(q[: self.per_image])  # warm-up (numba/faiss/openmp start, caches)
        runs = []
        for _ in range(repeats):
            with measured() as m:
                bank.search(q, k=1)
            runs.append(m)
        m = median_run(runs)
        extra["seconds_runs"] = seconds_runs(runs)
        distances, indices = bank.search(self.chosen, k=1)
        quality = {"recall_at_1": round(float((indices[:, 0] == self.exact_index).float().mean()), 4),
                   "max_abs_err_vs_float64": float((distances[:, 0].double() - self.truth).abs().max())}
        self.rec.emit("search", len(q), self.bank_features.shape[1], None, m["seconds"], len(q), m["peak_rss_mb"],
                      variant=name, bank_size=len(bank), search_dim=bank.search_dim,
                      images_per_s=round(len(q) / self.per_image / m["seconds"], 2), **quality, **gpu_peak(m),
                      **self.extra, **extra)


def bench_search(rec: Recorder, bank_features: torch.Tensor, queries: torch.Tensor, per_image: int,
                 slow_queries: int, full: bool = False, threads: bool = True, **extra) -> None:
    """Every backend against float64 brute force on a subset of the queries (recall@1, largest distance
    error). Every-distance searches in all dimensions run on ``slow_queries`` queries only, once."""
    bench = SearchBench(rec, bank_features, queries, per_image, extra)
    bench.run("exact, all dimensions, every distance (the starting point's search)",
              bank_with(bank_features, ReferenceSearch()), limit=slow_queries, repeats=1)
    span = bank_with(bank_features, SpanSearch())
    full_rank = span.search_dim == bank_features.shape[1]  # no span: as slow as the line above
    bench.run("exact, bank span, every distance", span, **({"limit": slow_queries, "repeats": 1} if full_rank else {}))
    default = bank_with(bank_features)
    bench.run(DEFAULT, default, strategy=default.strategy.name)
    if threads:
        with_thread_counts(lambda: bench.run(DEFAULT, default, strategy=default.strategy.name))
    if full and default.strategy.name == "pruned":  # fewer or more queries per block, with the bound's
        defaults = PrunedSearch()                     # product in the same cache-sized chunks
        for queries_per_block in (128, 512):
            chunk_rows = defaults.query_block * defaults.chunk_rows // queries_per_block
            bench.run(DEFAULT, bank_with(bank_features, PrunedSearch(query_block=queries_per_block,
                                                                     chunk_rows=chunk_rows)),
                      query_block=queries_per_block)
    if not have_faiss() or bank_features.device.type != "cpu":
        return
    bench.run("faiss flat (bank span)", bank_with(bank_features, FaissSearch("flat")))
    for nprobe in (4, 16, 64) if full else (16, 64):
        bank = bank_with(bank_features, FaissSearch("ivf", nprobe=nprobe))
        bench.run(f"faiss ivf nprobe={nprobe}", bank, nlist=bank.strategy.nlist, nprobe=nprobe)


def with_thread_counts(measure) -> None:
    """``measure()`` again with 1 and 2 torch threads (those not already the default), then restore."""
    threads = torch.get_num_threads()
    for count in sorted({1, 2} - {threads}):
        torch.set_num_threads(count)
        try:
            measure()
        finally:
            torch.set_num_threads(threads)
