"""faiss search over the bank's search coordinates: ``flat`` (exact, faiss's BLAS search) or ``ivf``.

``ivf``: inverted lists, ``nlist`` k-means cells of which ``nprobe`` are searched per query
(approximate; the distances of the neighbours found are recomputed exactly, ``recheck``). The
index holds the bank in its span (``core.search.span``), like the exact strategies. Runs on the
GPU when the bank is on one and faiss was built with GPU support.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from core.search.reference import recheck
from core.search.span import Frame, PrincipalAxes

INDEXES = ("flat", "ivf")
MIN_POINTS_PER_LIST = 39  # faiss wants at least this many training points per inverted list
QUERY_CHUNK = 65536  # queries per faiss call


def import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("search.backend=faiss needs the faiss package: pip install faiss-cpu "
                          "(or faiss-gpu), or use search.backend=exact") from error
    return faiss


def default_nlist(bank_rows: int) -> int:
    """``4 sqrt(M)`` cells, as faiss's guidelines suggest."""
    return max(1, int(4 * math.sqrt(bank_rows)))


class FaissSearch:
    """A faiss index over the bank (see the module docstring); ``nlist`` is the cell count used."""

    def __init__(self, index: str = "flat", nlist: int | None = None, nprobe: int = 16) -> None:
        if index not in INDEXES:
            raise ValueError(f"search.index={index!r}: choose one of {INDEXES}")
        self.faiss = import_faiss()
        self.index_type, self.requested_nlist, self.nprobe = index, nlist, nprobe
        self.name = f"faiss-{index}"
        self.nlist: int | None = None

    def build(self, features: torch.Tensor, frame: Frame | None = None) -> FaissSearch:
        """``frame``: the bank's span, else the centred bank."""
        if frame is None:
            axes = PrincipalAxes.of(features)
            frame = Frame.span(features, axes) or Frame.centred(features, axes.mean)
        self.frame, self.device = frame, features.device
        self.index = self._new_index()
        return self

    @property
    def search_dim(self) -> int:
        return self.frame.dim

    def to(self, device: torch.device) -> None:
        self.frame.to(device)
        self.device = device
        self.index = self._new_index()

    def _new_index(self):
        faiss = self.faiss
        data = np.ascontiguousarray(self.frame.coords.detach().cpu().numpy(), dtype=np.float32)
        dim = data.shape[1]
        if self.index_type == "flat":
            index = faiss.IndexFlatL2(dim)
        else:
            nlist = self.requested_nlist or default_nlist(len(data))
            self.nlist = nlist = max(1, min(nlist, len(data) // MIN_POINTS_PER_LIST or 1))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
            index.cp.seed = 1234
            index.train(data)
            index.nprobe = min(self.nprobe, nlist)
        index.add(data)
        if self.device.type == "cuda":
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                self._gpu_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, index)
            else:
                warnings.warn("search.backend=faiss on device=cuda, but this faiss has no GPU support: searching "
                              "on the CPU (install faiss-gpu, or use search.backend=exact for GPU search)",
                              stacklevel=4)
        return index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss finds the neighbours (its threads: ``torch.get_num_threads()``, see ``core.threads``);
        their distances are recomputed from the differences."""
        coords, outside = self.frame.queries(queries)
        self.faiss.omp_set_num_threads(torch.get_num_threads())
        array = np.ascontiguousarray(coords.detach().cpu().numpy(), dtype=np.float32)
        distances, indices = [], []
        for start in range(0, len(array), QUERY_CHUNK):
            _, where = self.index.search(array[start : start + QUERY_CHUNK], k)
            squared, where = recheck(self.frame.coords, coords[start : start + QUERY_CHUNK],
                                     torch.from_numpy(where).long().to(coords.device))
            distances.append(squared)
            indices.append(where)
        squared = torch.cat(distances)
        if outside is not None:
            squared += outside[:, None]
        return squared.clamp_min_(0).sqrt_(), torch.cat(indices)
