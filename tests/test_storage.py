"""Fit-time storage: .npy spill and cache files, a cache hit without the backbone, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.feature_files import FeatureFile
from core.storage import EmbeddedBatch, FeatureStore, StorageOptions


class Dataset:
    """What the cache fingerprints: ``samples`` with a ``path`` and a ``preprocessing``."""

    def __init__(self, paths) -> None:
        self.samples = [type("Sample", (), {"path": path})() for path in paths]
        self.preprocessing = "resize 64"


@pytest.fixture
def identity(tmp_path) -> dict:
    paths = []
    for number in range(3):
        path = tmp_path / "images" / f"{number}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([number]) * 10)
        paths.append(path)
    return {"extractor": {"target": "toy", "kwargs": {}}, "embedder": {"embed_dim": 4}, "dataset": Dataset(paths)}


DATA = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))  # 3 images, 5 patches, 4-d


def batches(consumed: list | None = None, fail_after: int | None = None):
    for number in range(len(DATA)):
        if fail_after is not None and number == fail_after:
            raise KeyboardInterrupt  # an interrupt mid-way
        if consumed is not None:
            consumed.append(number)
        yield EmbeddedBatch(DATA[number : number + 1], (1, 5), (8, 40))


def test_in_memory_by_default() -> None:
    features = FeatureStore(StorageOptions()).gather(batches(), images=3)
    assert features.info == {"cached": False, "spilled": False, "buffer_bytes": 15 * 4 * 4}
    assert torch.equal(features[0:15], DATA.reshape(15, 4)) and features.grid == (1, 5)
    assert features.input_size == (8, 40) and features.shape == (15, 4) and len(features) == 15


def test_spill_file_is_npy_and_deleted_on_release(tmp_path) -> None:
    features = FeatureStore(StorageOptions(spill_dir=str(tmp_path), dtype="float16")).gather(batches(), images=None)
    (path,) = tmp_path.iterdir()
    assert path.suffix == ".npy" and features.info["spilled"] and features.info["buffer_bytes"] == 15 * 4 * 2
    stored = np.load(path)  # numpy's own format
    assert stored.dtype == np.float16 and stored.shape == (15, 4)
    assert torch.equal(torch.from_numpy(stored), DATA.reshape(15, 4).half())
    assert torch.equal(features.take(torch.tensor([14, 0, 7])), DATA.reshape(15, 4).half()[[14, 0, 7]])
    with features:
        pass
    assert not path.exists()


def test_cache_entry_is_npy_and_a_hit_does_not_consume_the_batches(tmp_path, identity) -> None:
    store = FeatureStore(StorageOptions(cache_dir=str(tmp_path / "cache")))
    cold = store.gather(batches(), images=3, identity=identity)
    assert not cold.info["cached"] and cold.info["spilled"]
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".npy")
    assert json.loads((tmp_path / "cache" / entries[0]).read_text()) == {"grid": [1, 5], "input_size": [8, 40]}
    cold.release()  # a cache entry is kept
    consumed: list = []
    warm = store.gather(batches(consumed), images=3, identity=identity)
    assert consumed == [] and warm.info["cached"]
    assert torch.equal(warm[0:15], DATA.reshape(15, 4)) and warm.grid == (1, 5) and warm.input_size == (8, 40)
    other = FeatureStore(StorageOptions(cache_dir=str(tmp_path / "cache"), dtype="float16"))
    assert not other.gather(batches(), images=3, identity=identity).info["cached"]  # another dtype: new entry


def test_an_entry_without_its_metadata_does_not_count(tmp_path, identity) -> None:
    store = FeatureStore(StorageOptions(cache_dir=str(tmp_path)))
    store.gather(batches(), images=3, identity=identity)
    next(tmp_path.glob("*.json")).unlink()
    consumed: list = []
    assert not store.gather(batches(consumed), images=3, identity=identity).info["cached"] and consumed == [0, 1, 2]


@pytest.mark.parametrize("where", ["spill", "cache"])
def test_an_interrupt_mid_gather_leaves_no_file(tmp_path, identity, where) -> None:
    options = StorageOptions(spill_dir=str(tmp_path)) if where == "spill" else StorageOptions(cache_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(options).gather(batches(fail_after=2), images=3, identity=identity)
    assert list(tmp_path.glob("**/*.npy")) == [] and list(tmp_path.glob("**/*.json")) == []
    assert not [path for path in tmp_path.iterdir() if path.is_file()]


def test_no_batches_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="yielded no images"):
        FeatureStore(StorageOptions(spill_dir=str(tmp_path))).gather(iter([]), images=3)


def test_truncated_file_is_refused(tmp_path) -> None:
    FeatureStore(StorageOptions(spill_dir=str(tmp_path))).gather(batches(), images=3)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="incomplete"):
        FeatureFile(path)
