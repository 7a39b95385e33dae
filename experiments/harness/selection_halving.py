"""Successive halving for configuration selection (docs/selection.md, Budget): the ``select.halving`` node,
the training-subset size of each rung and who goes on to the next.

With ``n`` candidates and ``eta``, rung 0 fits every candidate on a seeded subset of the training part, keeps
the best ceil(n / eta) (ties: the earlier candidate) for rung 1 on an ``eta`` times larger subset, and so on;
the last rung fits its 2..eta survivors (plus the run's own configuration, carried to every rung) on the whole
training part and the best of them wins. Rung r of R
fits on ``n_full // eta**(R - r)`` images (at least ``min_train_images``); the subsets are nested
(selection_scoring.fit_subset) and a score is keyed by its subset, so a rung whose subset equals the next
one's is not fitted twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Halving:
    """``select.halving`` (its defaults live in conf/select.yaml)."""

    eta: int  # 1 / eta of a rung's candidates go on, on eta times more images
    min_train_images: int  # no rung fits on fewer (a PatchCore bank of a handful of images ranks noisily)

    @classmethod
    def from_node(cls, node: Mapping | bool | None) -> Halving | None:
        """``select.halving``: null or false for the plain grid, else ``{eta, min_train_images}``, checked."""
        if node is None or node is False:
            return None
        if not isinstance(node, Mapping) or set(node) != {"eta", "min_train_images"}:
            raise ValueError(f"select.halving={node!r}: give both eta and min_train_images (conf/select.yaml: "
                             "{eta: 3, min_train_images: 8}), or null for the plain grid (every candidate on the "
                             "whole training part)")
        halving = cls(**node)
        for key, least in (("eta", 2), ("min_train_images", 1)):
            value = getattr(halving, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"select.halving.{key}={value!r} must be an integer >= {least}")
        return halving

    def record(self) -> dict:
        return {"eta": self.eta, "min_train_images": self.min_train_images}


def rung_sizes(n_candidates: int, n_full: int, halving: Halving | None) -> list[int | None]:
    """The training-subset size of each rung (None: the whole training part, always the last rung's)."""
    if halving is None:
        return [None]
    rounds, alive = 0, n_candidates
    while alive > halving.eta:  # the last rung compares 2..eta candidates
        alive, rounds = math.ceil(alive / halving.eta), rounds + 1
    sizes: list[int | None] = []
    for rung in range(rounds):
        size = max(halving.min_train_images, n_full // halving.eta ** (rounds - rung))
        sizes.append(None if size >= n_full else size)
    return [*sizes, None]


def survivors(alive: Sequence[int], scores: Mapping[int, float | None], eta: int, keep: int | None = None) -> list[int]:
    """The best ceil(len(alive) / eta) of ``alive`` (candidate indices) by score, in candidate order; ties keep
    the earlier candidate; a candidate without a finite score never goes on. ``keep`` (the run's own
    configuration) goes on whatever its rank, so the winner is compared with it on the whole training part: the
    choice is never worse than the defaults by the proxy at full size (as checkpoint selection keeps step 0)."""
    ranked = sorted((i for i in alive if scores.get(i) is not None), key=lambda i: -scores[i])  # stable: ties
    chosen = ranked[: math.ceil(len(alive) / eta)]
    if keep is not None and keep in ranked and keep not in chosen:
        chosen.append(keep)
    return sorted(chosen)


def planned(n_candidates: int, sizes: Sequence[int | None], n_full: int, eta: int, keep: bool = False) -> list[dict]:
    """Each rung's candidates and training images (the budget, before any fit; the time-left estimate's total):
    at most, with ``keep`` (the base carried to every rung when it is not among the best)."""
    rungs, alive = [], n_candidates
    for rung, size in enumerate(sizes):
        rungs.append({"candidates": alive, "n_fit": size or n_full})
        if rung < len(sizes) - 1:
            alive = min(alive, math.ceil(alive / eta) + int(keep))
    return rungs
