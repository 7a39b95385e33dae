"""Shared setup of the GPU tests: exact float32 arithmetic for CPU/GPU comparisons, and a few textures images.

The tests in this folder are marked ``gpu`` (``make test`` deselects them, ``make test-gpu`` selects only
them) and skip without CUDA, so collecting them on a CPU costs an import of torch and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

# cuBLAS reads this when its first handle is created, i.e. before any test here runs a matrix product;
# torch.use_deterministic_algorithms (the fine-tuning resume test) needs it for reproducible GEMMs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CATEGORY = "brick"
TRAIN_IMAGES = 6  # 6 x 28 x 28 = 4704 patches: a coreset of 470, seconds on either device
TEST_IMAGES = 6


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN: with it, an Ampere-or-later GPU multiplies with 10-bit mantissas and
    GPU/CPU differences grow from float32 rounding (~1e-6 relative) to ~1e-3. What remains is the order in
    which the two devices sum (cuDNN's and oneDNN's convolution algorithms, cuBLAS's and MKL's GEMM
    blocking): the tolerances of these tests are sized for that."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.fixture(scope="session")
def few_images(textures_root: Path) -> tuple[DataLoader, DataLoader]:
    """``(train, test)`` loaders over a few images of one textures category (test: good and defective)."""
    from core.data import Preprocessing, TexturesLayout

    layout, preprocessing = TexturesLayout(root=textures_root), Preprocessing()
    train = layout.train_set(CATEGORY, preprocessing)
    test = layout.test_set(CATEGORY, preprocessing)
    step = max(1, len(test) // TEST_IMAGES)  # spread over the sorted list: good images first, then defects
    test_rows = list(range(0, len(test), step))[:TEST_IMAGES]
    return (DataLoader(Subset(train, range(TRAIN_IMAGES)), batch_size=3),
            DataLoader(Subset(test, test_rows), batch_size=3))


def _coverage_radius(features: torch.Tensor, chosen: torch.Tensor, block: int = 4096) -> float:
    """Largest distance of any feature to its nearest chosen one, in float64 (what k-center minimises): two
    coresets that differ after a near-tie must still cover the features equally well."""
    points = features.double().cpu()
    centres = points[chosen.cpu()]
    radius = 0.0
    for start in range(0, len(points), block):
        radius = max(radius, float(torch.cdist(points[start : start + block], centres).min(dim=1).values.max()))
    return radius


@pytest.fixture
def coverage_radius():
    return _coverage_radius
