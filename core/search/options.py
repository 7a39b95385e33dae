"""``SearchOptions``: the ``search`` config node, saved with a fitted model (``record``). A leaf: the bank
(``core.search.bank``) reads these options, never the other way round."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from core.search import faiss_index

log = logging.getLogger(__name__)

BACKENDS = ("exact", "faiss")


@dataclass
class SearchOptions:
    """How the bank is searched: ``exact`` (``core.search.choose_strategy`` picks the fastest exact search)
    or ``faiss`` with a ``flat`` (exact) or ``ivf`` (approximate) index."""

    backend: str = "exact"  # exact | faiss
    index: str = "flat"  # faiss index: flat | ivf
    nlist: int | None = None  # ivf cells; null = 4 * sqrt(bank size)
    nprobe: int = 16  # ivf cells searched per query

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"search.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.index not in faiss_index.INDEXES:
            raise ValueError(f"search.index={self.index!r}: choose one of {faiss_index.INDEXES}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"search.nlist={self.nlist} must be positive, or null for 4*sqrt(bank size)")
        if self.nprobe < 1:
            raise ValueError(f"search.nprobe={self.nprobe} must be positive")
        if self.backend == "faiss":
            faiss_index.import_faiss()  # fail at construction, before any fitting, when faiss is missing

    def record(self) -> dict:
        """What a saved model needs to be searched as fitted (the constructor's keywords)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict, where: str) -> SearchOptions:
        """The options a model was saved with (``where``: the model, for the message); exact search when
        they need faiss and it is missing (the same neighbours or closer ones, only slower)."""
        try:
            return cls(**record)
        except ImportError:
            log.warning("%s was fitted with search.backend=faiss, which is not installed here: searching it "
                        "exactly (pip install faiss-cpu to search it as it was)", where)
            return cls(**{**record, "backend": "exact"})
