"""``device="cuda"`` end to end: fit + predict on a few textures images equal the CPU's, for EfficientNet-Lite0
(real weights) and WRN50 (random seeded weights), and a CPU-fitted model loaded onto the GPU scores alike.

Tolerances: with TF32 off (conftest), the backbone features of the two devices differ by float32 rounding
in a different summation order (~1e-6 relative per layer, growing with depth), so scores and maps are
compared to ``RTOL`` relative to their largest value. The coresets are compared first: the GPU runs the
plain loop, the CPU the batched one; both pick the same points unless two candidates' distances tie to
within that rounding, and then the bank (and the scores) may differ by more than ``RTOL``: the coverage
radius must then stay within 1 % (``coverage_radius``), and the scores within ``RTOL_OTHER_BANK``.
"""

from __future__ import annotations

import pytest
import torch

from core.backbones import EfficientNetLite, TorchvisionCNN
from core.coreset import GreedyCoresetSampler
from core.patchcore import PatchCore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RTOL = 1e-3  # scores and maps, relative to the largest value, same bank
RTOL_OTHER_BANK = 2e-2  # the same, when a near-tie made the two coresets differ
RADIUS_RTOL = 1e-2  # coverage radius of the two coresets (the 1 %)


class RecordingSampler(GreedyCoresetSampler):
    """The default greedy sampler, keeping the indices it chose (for comparing the two devices' coresets)."""

    def select(self, features, progress: bool = True) -> torch.Tensor:
        self.chosen = super().select(features, progress).cpu()
        return self.chosen


def make_extractor(backbone: str):
    """One extractor for both devices (each PatchCore runs its own copy); WRN50's random init is seeded."""
    if backbone == "effnet_lite0":
        return EfficientNetLite(pretrained=True)
    return TorchvisionCNN("wide_resnet50_2", ["layer2", "layer3"], pretrained=False, name="wrn50")


def fit(extractor, device: str, train) -> PatchCore:
    model = PatchCore(extractor, sampler=RecordingSampler(ratio=0.1), device=device, progress=False)
    report = model.fit(train)
    assert report.n_images == len(train.dataset) and report.bank_size == len(model.bank)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= rtol * scale, f"{what}: max difference {error:.3g} > {rtol} x {scale:.3g}"


@pytest.mark.parametrize("backbone", ["effnet_lite0", "wrn50"])
def test_fit_and_predict_on_cuda_equal_cpu(backbone, few_images, coverage_radius, tmp_path) -> None:
    train, test = few_images
    extractor = make_extractor(backbone)
    cpu, gpu = fit(extractor, "cpu", train), fit(extractor, "cuda", train)
    assert gpu.bank.features.is_cuda and gpu.bank.strategy.name in ("reference", "span")
    expected, actual = cpu.predict(test), gpu.predict(test)
    same_bank = torch.equal(cpu.sampler.chosen.sort().values, gpu.sampler.chosen.sort().values)
    if not same_bank:  # a near-tie broke differently: the k-center objective must still agree
        features = torch.cat([cpu.embed(batch["image"])[0].reshape(-1, cpu.bank.dim) for batch in train])
        cpu_radius = coverage_radius(features, cpu.sampler.chosen)
        gpu_radius = coverage_radius(features, gpu.sampler.chosen)
        assert abs(gpu_radius - cpu_radius) <= RADIUS_RTOL * cpu_radius, (gpu_radius, cpu_radius)
    rtol = RTOL if same_bank else RTOL_OTHER_BANK
    assert_close(torch.from_numpy(actual.image_scores), torch.from_numpy(expected.image_scores), rtol, "image scores")
    assert_close(torch.from_numpy(actual.maps), torch.from_numpy(expected.maps), rtol, "anomaly maps")
    assert (actual.labels == expected.labels).all()

    # the CPU's bank loaded onto the GPU: the same bank, so only the features' rounding differs
    cpu.save(tmp_path / "model")
    loaded = PatchCore.load(tmp_path / "model", expected_spec=cpu.spec(), device="cuda", progress=False)
    assert loaded.bank.features.is_cuda
    reloaded = loaded.predict(test)
    assert_close(torch.from_numpy(reloaded.image_scores), torch.from_numpy(expected.image_scores), RTOL,
                 "image scores (CPU bank on the GPU)")
    assert_close(torch.from_numpy(reloaded.maps), torch.from_numpy(expected.maps), RTOL, "maps (CPU bank on the GPU)")

