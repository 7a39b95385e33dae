"""experiments/benchmarks/real_search.py measures the pruned search's loop and a first-pass variant outside the
library: both must still find every query's exact nearest distance (else their counts and times mean nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.search import pruned
from experiments.benchmarks.real_search import nearest_squared, refine_shares, streamed

pytestmark = pytest.mark.skipif(pruned.numba is None, reason="the pruned search needs numba")


def test_the_measured_loops_find_the_exact_nearest_distances() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(32, 192, generator=generator)
    bank = torch.randn(6000, 32, generator=generator) @ mixing + 0.3 * torch.randn(6000, 192, generator=generator)
    queries = torch.randn(400, 32, generator=generator) @ mixing + 0.3 * torch.randn(400, 192, generator=generator)
    strategy = pruned.PrunedSearch().build(bank)
    coords = strategy.frame.queries(queries)[0].contiguous()
    truth = nearest_squared(coords, strategy.frame.coords).numpy()
    for narrow in (None, 16):
        stats, squared, hard = streamed(strategy, coords, narrow)
        assert not hard.all() and stats["evaluated_mean"] >= 1
        np.testing.assert_allclose(squared[~hard], truth[~hard], rtol=1e-4, atol=1e-3)
    # a bound below the true nearest distance rules out more rows the wider it is; the full width leaves ~none
    shares = [refine_shares(coords, strategy.frame.coords, torch.from_numpy(truth), w) for w in (8, 32, 192)]
    assert shares[0] >= shares[1] >= shares[2] and shares[2] < 0.01
