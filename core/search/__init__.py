"""Nearest-neighbour search over the memory bank.

``MemoryBank`` (``bank``) holds the coreset and delegates the search to one strategy, picked by
``choose_strategy``: ``reference`` (blocked matrix products: the one to check the others against),
``span`` (the same in the bank's span), ``pruned`` (a lower bound rules out most pairs; numba) and
``faiss_index`` (faiss flat / IVF). ``SearchOptions`` is the ``search`` config node.
"""

from core.search.bank import MemoryBank, SearchStrategy, choose_strategy
from core.search.faiss_index import FaissSearch
from core.search.options import SearchOptions
from core.search.pruned import PrunedSearch
from core.search.reference import ReferenceSearch
from core.search.span import SpanSearch

__all__ = ["FaissSearch", "MemoryBank", "PrunedSearch", "ReferenceSearch", "SearchOptions", "SearchStrategy",
           "SpanSearch", "choose_strategy"]
