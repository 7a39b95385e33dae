"""The greedy coreset on the GPU (the plain loop, ``method="auto"`` on CUDA) against the CPU's selection.

Same seed, same features: the same indices, or, where the devices' different summation orders break a
near-tie differently, a coverage radius (computed in float64) within 1 % of the CPU's.
"""

from __future__ import annotations

import pytest
import torch

from core.backbones import EfficientNetLite
from core.coreset import greedy_coreset
from core.patchcore import PatchCore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RADIUS_RTOL = 1e-2


@pytest.fixture(scope="module")
def training_features(few_images) -> torch.Tensor:
    """Real patch features (EfficientNet-Lite0 on the textures images), computed on the CPU."""
    model = PatchCore(EfficientNetLite(pretrained=True), progress=False)
    batches = [model.embed(batch["image"])[0] for batch in few_images[0]]
    return torch.cat([features.reshape(-1, features.shape[-1]) for features in batches])


def assert_same_coreset(gpu: torch.Tensor, cpu: torch.Tensor, features: torch.Tensor, coverage_radius) -> None:
    assert len(gpu) == len(cpu) and len(set(gpu.tolist())) == len(gpu)
    if torch.equal(gpu.cpu(), cpu.cpu()):
        return
    cpu_radius, gpu_radius = coverage_radius(features, cpu), coverage_radius(features, gpu)
    assert abs(gpu_radius - cpu_radius) <= RADIUS_RTOL * cpu_radius, (gpu_radius, cpu_radius)


@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_gpu_plain_loop_matches_cpu_selection(training_features, coverage_radius, ratio) -> None:
    cpu = greedy_coreset(training_features, ratio, seed=3, progress=False)  # auto on the CPU: the batched loop
    gpu = greedy_coreset(training_features.cuda(), ratio, seed=3, progress=False)  # auto on CUDA: the plain loop
    assert_same_coreset(gpu, cpu, training_features, coverage_radius)


def test_gpu_plain_loop_matches_cpu_plain_loop(training_features, coverage_radius) -> None:
    cpu = greedy_coreset(training_features, 0.1, seed=3, progress=False, method="plain")
    gpu = greedy_coreset(training_features.cuda(), 0.1, seed=3, progress=False, method="plain")
    assert_same_coreset(gpu, cpu, training_features, coverage_radius)


def test_gpu_coreset_of_half_precision_features(training_features, coverage_radius) -> None:
    """float16 rows (what ``storage.dtype=float16`` keeps) are projected in float32 on the GPU as on the CPU."""
    half = training_features.half()
    cpu = greedy_coreset(half, 0.1, seed=3, progress=False)
    gpu = greedy_coreset(half.cuda(), 0.1, seed=3, progress=False)
    assert_same_coreset(gpu, cpu, half.float(), coverage_radius)
