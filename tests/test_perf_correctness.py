"""The performance paths keep the results: spilled and float16 buffers, the feature cache, feature files."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core.backbones import FeatureExtractor
from core.coreset import GreedyCoresetSampler, greedy_coreset
from core.data import TexturesLayout
from core.feature_files import FeatureFile
from core.features import PatchEmbedder
from core.patchcore import PatchCore
from core.storage import EmbeddedBatch, FeatureStore, StorageOptions, TrainingFeatures


class CountingExtractor(FeatureExtractor):
    """A fixed toy backbone (8x8 average pooling plus a fixed 1x1 conv) that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.layers = "toy", ["pool"]
        self.mix = torch.nn.Conv2d(3, 24, 1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(24, 3, 1, 1, generator=torch.Generator().manual_seed(0)))
            self.mix.bias.zero_()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        return [torch.tanh(self.mix(F.avg_pool2d(images, 8)))]


@pytest.fixture(scope="module")
def train_loader(textures_root) -> DataLoader:
    layout = TexturesLayout(root=textures_root, categories=["brick"], resize=64, image_size=64)
    preprocessing = layout.preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return DataLoader(layout.train_set("brick", preprocessing), batch_size=8)


def fit(loader, ratio: float = 0.25, **storage) -> PatchCore:
    model = PatchCore(CountingExtractor(), PatchEmbedder(embed_dim=None, aggregation="channel_mean"),
                      GreedyCoresetSampler(ratio, proj_dim=8),
                      progress=False, storage=StorageOptions(**storage))
    model.fit(loader)
    return model


def test_spilled_buffer_gives_the_same_bank(train_loader, tmp_path) -> None:
    in_memory = fit(train_loader)
    spilled = fit(train_loader, spill_dir=str(tmp_path / "spill"))
    assert spilled.fit_info["spilled"] and not in_memory.fit_info["spilled"]
    assert torch.equal(spilled.bank.features, in_memory.bank.features)
    assert list((tmp_path / "spill").iterdir()) == []  # the spill file is removed after the fit


def test_spill_threshold_keeps_small_buffers_in_memory(train_loader, tmp_path) -> None:
    model = fit(train_loader, spill_dir=str(tmp_path), spill_above_gb=1.0)
    assert not model.fit_info["spilled"]


def test_float16_buffer_gives_nearly_the_same_scores(train_loader) -> None:
    full = fit(train_loader)
    half = fit(train_loader, dtype="float16")
    assert half.fit_info["buffer_bytes"] * 2 == full.fit_info["buffer_bytes"]
    images = next(iter(train_loader))["image"][:2] * 1.3
    full_scores, full_maps = full.score(images)
    half_scores, half_maps = half.score(images)
    torch.testing.assert_close(half_scores, full_scores, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(half_maps, full_maps, rtol=1e-2, atol=1e-2)


def test_feature_cache_skips_extraction_and_keys_on_the_inputs(train_loader, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    cold = fit(train_loader, cache_dir=cache)
    assert cold.inference_copy.calls > 0 and not cold.fit_info["cached"]
    warm = fit(train_loader, ratio=0.25, cache_dir=cache)
    assert warm.inference_copy.calls == 0 and warm.fit_info["cached"]
    assert torch.equal(warm.bank.features, cold.bank.features)
    assert warm.grid == cold.grid and warm.input_size == cold.input_size
    other_ratio = fit(train_loader, ratio=0.5, cache_dir=cache)
    assert other_ratio.inference_copy.calls == 0 and len(other_ratio.bank) == 2 * len(cold.bank)
    assert fit(train_loader, cache_dir=cache, dtype="float16").inference_copy.calls > 0  # another dtype: new entry
    first = train_loader.dataset.samples[0].path
    stat = os.stat(first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed image invalidates the entry
    try:
        assert fit(train_loader, cache_dir=cache).inference_copy.calls > 0
    finally:
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_loader_without_a_length_grows_the_buffer() -> None:
    images = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [{"image": images[i : i + 2]} for i in range(0, 7, 2)]  # a plain list: no .dataset
    model = PatchCore(CountingExtractor(), PatchEmbedder(embed_dim=None), GreedyCoresetSampler(1.0), progress=False)
    report = model.fit(batches)
    assert report.n_images == 7 and report.n_patches == 7 * 16


def spilled(data: torch.Tensor, directory, batch: int = 300) -> TrainingFeatures:
    """``data`` gathered into a spill file (the buffer is sized for 10 rows: it grows) in ``batch``-row pieces."""
    store = FeatureStore(StorageOptions(spill_dir=str(directory)))
    batches = (EmbeddedBatch(data[start : start + batch][None], (1, 1), (1, 1)) for start in range(0, len(data), batch))
    return store.gather(batches, images=10)


def test_disk_features_read_like_the_tensor(tmp_path) -> None:
    data = torch.randn(1000, 12)
    disk = spilled(data, tmp_path)
    (path,) = tmp_path.iterdir()
    assert disk.info["spilled"] and disk.shape == (1000, 12) and len(disk) == 1000
    assert torch.equal(disk[100:250], data[100:250])
    indices = torch.tensor([999, 3, 500, 3, 0])
    assert torch.equal(disk.take(indices), data[indices])
    assert torch.equal(FeatureFile(path).take(indices, chunk=7), data[indices])
    assert torch.equal(greedy_coreset(disk, 0.05, proj_dim=6, progress=False),
                       greedy_coreset(data, 0.05, proj_dim=6, progress=False))
    disk.release()
    assert not path.exists()


def test_incomplete_feature_file_is_refused(tmp_path) -> None:
    spilled(torch.randn(4, 3), tmp_path)
    (path,) = tmp_path.iterdir()
    with open(path, "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(ValueError, match="incomplete"):
        FeatureFile(path)
