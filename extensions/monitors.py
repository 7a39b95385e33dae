"""Collapse monitors, computed at every proxy evaluation (extensions/proxy.py).

A nominal-only objective can collapse PatchCore's features (PANDA, CVPR 2021; Mean-Shifted
Contrastive, AAAI 2023): every patch maps near a few directions, nearest-neighbour distances
shrink and stop separating defects. Three numbers say whether that is happening:

- ``effective_rank`` (Roy & Vetterli, EUSIPCO 2007) of the patch features of the held-out nominal
  images. Definition used here: centre the rows of ``X`` ([patches, dims]) on their mean, take its
  singular values ``s_i``, normalise them to ``p_i = s_i / sum_j s_j``, and return
  ``exp(-sum_i p_i log p_i)`` (``0 log 0 = 0``). It is 1 for rank-one features, ``k`` for ``k``
  equal singular values, and never more than ``min(patches - 1, dims)``.
- the spread of the held-out nominal patches' nearest-neighbour distances to the proxy memory bank
  (mean, standard deviation, and their ratio, which does not depend on the features' scale);
- ``weight_distance``: ``||w - w0||_2`` over the trainable backbone weights, the square root of the
  L2-SP term without its weight (extensions/protection.py), and relative to ``||w0||_2``.

A ``CollapseWarning`` is raised when the effective rank drops below ``collapse_fraction`` (default
0.5) of its value at step 0 (the pretrained weights).
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger("finetune")


class CollapseWarning(RuntimeWarning):
    """The fine-tuned features have lost most of their effective rank: they may have collapsed."""


@torch.no_grad()
def effective_rank(features: torch.Tensor) -> float:
    """``exp(entropy)`` of the normalised singular values of the mean-centred ``features`` ([N, D])."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"effective_rank needs a [N >= 2, D] matrix, got shape {tuple(features.shape)}")
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    if len(x) > x.shape[1]:  # many patches: the singular values from the small Gram matrix's eigenvalues
        singular = torch.linalg.eigvalsh(x.T @ x).clamp(min=0).sqrt()
    else:
        singular = torch.linalg.svdvals(x)
    total = singular.sum()
    if total <= 0:
        return 1.0  # every row equal: a single point, rank one by convention (the limit of one direction)
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def distance_spread(distances: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation and their ratio (coefficient of variation) of nearest-neighbour distances."""
    d = distances.double().flatten()
    mean, std = float(d.mean()), float(d.std(correction=0))
    return {"nn_distance_mean": mean, "nn_distance_std": std, "nn_distance_cv": std / mean if mean > 0 else 0.0}


def check_collapse(rank: float, start_rank: float, fraction: float, step: int) -> bool:
    """Warn (``CollapseWarning``, and the log) when ``rank`` < ``fraction`` * the step-0 rank; return whether."""
    if rank >= fraction * start_rank:
        return False
    message = (f"effective rank of the nominal patch features fell to {rank:.2f} at step {step}, below "
               f"{fraction:g} x its pretrained value {start_rank:.2f}: the features may be collapsing "
               "(lower method.train.lr, raise method.train.l2sp_weight, or trust the proxy's checkpoint selection)")
    log.warning(message)
    warnings.warn(message, CollapseWarning, stacklevel=2)
    return True
