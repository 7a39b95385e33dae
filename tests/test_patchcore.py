"""PatchCore scoring against independent computations: NN distances, Eq. 7, maps, save/load."""

import json

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from core.backbones import FeatureExtractor, TorchvisionCNN
from core.coreset import GreedyCoresetSampler
from core.detector import collect_predictions
from core.features import PatchEmbedder
from core.patchcore import ModelMismatchError, PatchCore
from core.scoring import ScoringHead
from core.search import SearchOptions


class PoolingExtractor(FeatureExtractor):
    """A fixed toy backbone: 4x4 average pooling of the image, so features are easy to reason about."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.layers = "pool4", ["pool"]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [F.avg_pool2d(images, 4)]


def loader_of(images: torch.Tensor, batch_size: int = 3) -> torch.utils.data.DataLoader:
    dataset = [{"image": image, "label": 0} for image in images]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def fitted(images: torch.Tensor, embed_dim: int | None = None, **scoring) -> PatchCore:
    model = PatchCore(PoolingExtractor(), PatchEmbedder(embed_dim=embed_dim), GreedyCoresetSampler(ratio=1.0),
                      scoring=ScoringHead(**scoring), progress=False)
    model.fit(loader_of(images))
    return model


@pytest.mark.parametrize("embed_dim", [None, 8])  # 8: 3 channels pooled up to 8 (a low-rank bank)
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
def test_scores_and_maps_match_independent_computation(embed_dim, distance) -> None:
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(5, 3, 32, 32, generator=generator)
    test = torch.rand(2, 3, 32, 32, generator=generator)
    model = fitted(train, embed_dim, distance=distance)
    scores, maps = model.score(test)

    embedder = PatchEmbedder(embed_dim=embed_dim)
    bank, _ = embedder([F.avg_pool2d(train, 4)])
    queries, (h, w) = embedder([F.avg_pool2d(test, 4)])
    bank = bank.reshape(-1, bank.shape[-1]).double()
    patch_scores = torch.cdist(queries.double(), bank[None]).min(dim=-1).values  # [2, 64]
    if distance == "squared":  # the official code's faiss IndexFlatL2 distances
        patch_scores = patch_scores.square()
    torch.testing.assert_close(scores.double(), patch_scores.max(dim=1).values, rtol=1e-4, atol=1e-4)

    upsampled = F.interpolate(patch_scores.reshape(2, 1, h, w).float(), size=(32, 32), mode="bilinear",
                              align_corners=False)[:, 0].numpy()
    expected_maps = np.stack([scipy.ndimage.gaussian_filter(m.astype(np.float64), sigma=4.0) for m in upsampled])
    np.testing.assert_allclose(maps.numpy(), expected_maps, atol=1e-4)


def test_batches_scored_on_threads_give_the_sequential_result(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(3)
    model = fitted(torch.rand(6, 3, 32, 32, generator=generator))
    test = torch.rand(7, 3, 32, 32, generator=generator)
    dataset = [{"image": image, "label": i % 2, "path": f"image{i}.png"} for i, image in enumerate(test)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    sequential = collect_predictions(model.score, loader, progress=False, workers=1)
    threads = torch.get_num_threads()
    threaded = collect_predictions(model.score, loader, progress=False, workers=3)
    assert torch.get_num_threads() == threads  # restored after scoring
    assert sequential.paths == threaded.paths == [f"image{i}.png" for i in range(7)]  # loader order kept
    np.testing.assert_array_equal(threaded.labels, sequential.labels)
    np.testing.assert_allclose(threaded.image_scores, sequential.image_scores, rtol=1e-6)
    np.testing.assert_allclose(threaded.maps, sequential.maps, rtol=1e-6, atol=1e-6)


def test_num_neighbors_averages_k_distances() -> None:
    train = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    test = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    scores, _ = fitted(train, num_neighbors=3).score(test)
    bank, _ = PatchEmbedder(embed_dim=None)([F.avg_pool2d(train, 4)])
    queries, _ = PatchEmbedder(embed_dim=None)([F.avg_pool2d(test, 4)])
    dim = bank.shape[-1]
    distances = torch.cdist(queries[0].double(), bank.reshape(-1, dim).double())
    expected = distances.topk(3, largest=False).values.mean(dim=1).max()
    assert scores.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("embed_dim", [None, 8])
def test_eq7_reweighting_by_hand(embed_dim) -> None:
    train = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    test = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    b = 3
    plain, _ = fitted(train, embed_dim).score(test)
    weighted, _ = fitted(train, embed_dim, reweight_neighbors=b).score(test)

    bank, _ = PatchEmbedder(embed_dim=embed_dim)([F.avg_pool2d(train, 4)])
    bank = bank.reshape(-1, bank.shape[-1]).double().numpy()
    queries, _ = PatchEmbedder(embed_dim=embed_dim)([F.avg_pool2d(test, 4)])
    queries = queries[0].double().numpy()
    distances = np.linalg.norm(queries[:, None] - bank[None], axis=-1)
    worst = distances.min(axis=1).argmax()  # m_test,*
    s_star = distances[worst].min()
    m_star = distances[worst].argmin()  # m*
    support = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1))[:b]  # N_b(m*), m* first
    d_support = distances[worst, support]
    weight = 1 - np.exp(d_support[0]) / np.exp(d_support).sum()
    assert plain.item() == pytest.approx(s_star, rel=1e-4)
    assert weighted.item() == pytest.approx(weight * s_star, rel=1e-4)


def test_save_load_round_trip_and_mismatch(tmp_path) -> None:
    train = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    test = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    model = PatchCore(TorchvisionCNN("resnet18", ["layer2", "layer3"], pretrained=False),
                      PatchEmbedder(embed_dim=64), GreedyCoresetSampler(ratio=0.5), progress=False)
    model.fit(loader_of(train))
    model.save(tmp_path / "model", metadata={"category": "toy"})
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.metadata == {"category": "toy"}
    for before, after in zip(model.score(test), loaded.score(test)):
        torch.testing.assert_close(before, after)
    spec = model.spec() | {"embedder": {"embed_dim": 128, "patch_size": 3}}
    with pytest.raises(ModelMismatchError, match="embedder"):
        PatchCore.load(tmp_path / "model", expected_spec=spec)
    assert PatchCore.load(tmp_path / "model", expected_spec=model.spec()).bank.features.shape[1] == 64


def test_saved_model_is_searched_as_fitted(tmp_path, monkeypatch, caplog) -> None:
    pytest.importorskip("faiss")
    train = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    test = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    extractor = TorchvisionCNN("resnet18", ["layer2", "layer3"], pretrained=False)

    def fitted(search: SearchOptions | None = None) -> PatchCore:
        model = PatchCore(extractor, PatchEmbedder(embed_dim=64), GreedyCoresetSampler(ratio=1.0), progress=False,
                          search=search)
        model.fit(loader_of(train))
        return model

    options = SearchOptions(backend="faiss", index="ivf", nlist=4, nprobe=2)
    model = fitted(options)
    model.save(tmp_path / "model")
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.search == options and loaded.bank.strategy.name == model.bank.strategy.name
    for before, after in zip(model.score(test), loaded.score(test)):
        torch.testing.assert_close(before, after)
    assert PatchCore.load(tmp_path / "model", search=SearchOptions()).search.backend == "exact"  # an override

    def no_faiss():
        raise ImportError("no faiss here")

    monkeypatch.setattr("core.search.faiss_index.import_faiss", no_faiss)
    with caplog.at_level("WARNING"):
        moved = PatchCore.load(tmp_path / "model")  # on a machine without faiss: exact, with a warning
    assert moved.search.backend == "exact" and "not installed here" in caplog.text
    torch.testing.assert_close(moved.score(test)[0], fitted().score(test)[0])


def test_fit_report_counts() -> None:
    model = PatchCore(PoolingExtractor(), PatchEmbedder(embed_dim=None), GreedyCoresetSampler(ratio=0.25),
                      progress=False)
    report = model.fit(loader_of(torch.rand(7, 3, 16, 16)))
    assert (report.n_images, report.n_patches, report.bank_size) == (7, 7 * 16, 28)
    assert set(report.timings_s) == {"extract", "coreset"}


def test_no_hidden_side_effects() -> None:
    """The extractor is what was passed (the folded copy has its own name); the input size is recorded by
    ``fit``, not by every forward pass."""
    extractor = PoolingExtractor()
    model = PatchCore(extractor, PatchEmbedder(embed_dim=None), GreedyCoresetSampler(ratio=1.0), progress=False)
    assert model.extractor is extractor and model.inference_copy is not extractor
    model.embed(torch.rand(1, 3, 24, 24))
    assert model.input_size is None
    model.fit(loader_of(torch.rand(2, 3, 16, 16)))
    assert model.input_size == (16, 16) and model.grid == (4, 4)
    model.score(torch.rand(1, 3, 24, 24))
    assert model.input_size == (16, 16)


def test_saved_model_keeps_its_image_score(tmp_path) -> None:
    train = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    test = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    model = PatchCore(TorchvisionCNN("resnet18", ["layer2"], pretrained=False), PatchEmbedder(embed_dim=32),
                      GreedyCoresetSampler(ratio=0.5), progress=False,
                      scoring=ScoringHead(image_score="top_percent", top_percent=10.0, distance="cosine"))
    model.fit(loader_of(train))
    model.save(tmp_path / "model")
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    assert record["format_version"] == 3 and record["scoring"] == model.scoring.record()
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.scoring.record() == {"num_neighbors": 1, "reweight_neighbors": None, "distance": "cosine",
                                       "image_score": "top_percent", "top_percent": 10.0, "blur_sigma": 4.0}
    assert loaded.bank.metric == "cosine"
    torch.testing.assert_close(loaded.score(test)[0], model.score(test)[0])
