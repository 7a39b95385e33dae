"""The scoring head (core/scoring.py): its settings checked by name, patch scores, image scores (max, Eq. 7,
top percent) and maps against hand computations and brute force, both searches it runs over (the memory
bank and the exported graph's chunked search) answering alike, and ``PatchCore.score`` equal to the export
graph for every scoring variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.backbones import TorchvisionCNN
from core.coreset import GreedyCoresetSampler
from core.export import ChunkedNearest, ExportablePatchCore
from core.features import PatchEmbedder
from core.patchcore import PatchCore
from core.scoring import ScoringHead
from core.search import MemoryBank, ReferenceSearch

# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_neighbors": 0}, r"patchcore\.scoring\.num_neighbors=0 must be an integer >= 1"),
    ({"num_neighbors": "three"}, r"patchcore\.scoring\.num_neighbors='three' must be an integer >= 1"),
    ({"num_neighbors": True}, r"patchcore\.scoring\.num_neighbors=True must be an integer >= 1"),
    ({"num_neighbors": 2.0}, r"patchcore\.scoring\.num_neighbors=2\.0 must be an integer >= 1"),
    ({"reweight_neighbors": 0}, r"patchcore\.scoring\.reweight_neighbors=0 must be an integer >= 1, or null for off"),
    ({"reweight_neighbors": "3"}, r"patchcore\.scoring\.reweight_neighbors='3' must be an integer >= 1"),
    ({"distance": "manhattan"}, r"patchcore\.scoring\.distance='manhattan': choose one of \('euclidean'"),
    ({"distance": 1}, r"patchcore\.scoring\.distance=1: choose one of"),
    ({"image_score": "mean"}, r"patchcore\.scoring\.image_score='mean': choose one of \('max', 'top_percent'\)"),
    ({"top_percent": 0}, r"patchcore\.scoring\.top_percent=0 must be in \(0, 100\]"),
    ({"top_percent": 100.5}, r"patchcore\.scoring\.top_percent=100\.5 must be in \(0, 100\]"),
    ({"top_percent": "1"}, r"patchcore\.scoring\.top_percent='1' must be a finite number in \(0, 100\]"),
    ({"blur_sigma": -1}, r"patchcore\.scoring\.blur_sigma=-1 must be >= 0"),
    ({"blur_sigma": False}, r"patchcore\.scoring\.blur_sigma=False must be a finite number >= 0"),
    ({"blur_sigma": float("nan")}, r"patchcore\.scoring\.blur_sigma=nan must be a finite number >= 0"),
    ({"image_score": "top_percent", "reweight_neighbors": 3},
     r"patchcore\.scoring\.reweight_neighbors reweights the maximum.*patchcore\.scoring\.image_score=max"),
])
def test_bad_settings_name_the_key(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        ScoringHead(**settings)


def test_record_rebuilds_the_same_head() -> None:
    head = ScoringHead(num_neighbors=2, reweight_neighbors=4, distance="squared", blur_sigma=0, top_percent=5)
    assert head.record() == {"num_neighbors": 2, "reweight_neighbors": 4, "distance": "squared",
                             "image_score": "max", "top_percent": 5.0, "blur_sigma": 0.0}
    assert ScoringHead(**head.record()).record() == head.record()
    assert (head.metric, ScoringHead(distance="cosine").metric) == ("euclidean", "cosine")


# ------------------------------------------------------------------------------ the computation, by hand


def test_patch_scores_by_hand() -> None:
    distances = torch.tensor([[3.0, 4.0], [1.0, 1.0]])  # Euclidean, k = 2, nearest first
    expected = {"euclidean": [3.5, 1.0], "squared": [12.5, 1.0], "cosine": [6.25, 0.5]}  # cosine: d^2 / 2
    for distance, values in expected.items():
        got = ScoringHead(num_neighbors=2, distance=distance).patch_scores(distances)
        torch.testing.assert_close(got, torch.tensor(values))


def test_top_percent_and_max_by_hand() -> None:
    patch_scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 0.0, 0.0, 8.0]])
    none = torch.empty(0)
    for percent, expected in ((50, [4.0, 6.0]), (25, [5.0, 8.0]), (10, [5.0, 8.0]), (100, [2.75, 3.0])):
        head = ScoringHead(image_score="top_percent", top_percent=percent)
        torch.testing.assert_close(head.image_scores(patch_scores, none, none, None), torch.tensor(expected))
    torch.testing.assert_close(ScoringHead().image_scores(patch_scores, none, none, None), torch.tensor([5.0, 8.0]))


def test_eq7_by_hand_reuses_the_first_search() -> None:
    """A bank of four 1-d points, one test image of two patches; b = 2. The worst patch (x = 10) has m* = 7
    (bank row 2); N_2(m*) = {7, 4}; the weight is 1 - e^3 / (e^3 + e^6), computed here by hand."""
    bank = MemoryBank(metric="euclidean").build(torch.tensor([[0.0], [1.0], [7.0], [4.0]]), ReferenceSearch())
    searched = []
    search = bank.search
    bank.search = lambda queries, k: (searched.append(queries.clone()), search(queries, k))[1]
    features = torch.tensor([[[0.5], [10.0]]])  # [B=1, patches=2, D=1]
    scores, maps = ScoringHead(reweight_neighbors=2, blur_sigma=0).score(features, bank, (1, 2), (1, 2))
    weight = 1 - np.exp(3) / (np.exp(3) + np.exp(6))
    assert scores.item() == pytest.approx(3.0 * weight, rel=1e-6)
    torch.testing.assert_close(maps, torch.tensor([[[0.5, 3.0]]]))  # same grid: the patch scores, unblurred
    assert [q.tolist() for q in searched] == [[[0.5], [10.0]], [[7.0]]]  # the test patches once, then m* only


def test_cosine_is_one_minus_cos_over_unit_vectors() -> None:
    bank = MemoryBank(metric="cosine").build(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(2))  # normalised once, in the bank
    features = torch.tensor([[[1.0, 1.0], [5.0, 0.0]]])
    scores, _ = ScoringHead(distance="cosine", image_score="top_percent", top_percent=100,
                            blur_sigma=0).score(features, bank, (1, 2), (1, 2))
    expected = ((1 - np.cos(np.pi / 4)) + 0.0) / 2  # the mean of the two patches' 1 - cos
    assert scores.item() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------ both searches alike


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_memory_bank_and_chunked_search_answer_alike(metric, k) -> None:
    """The two ``NeighbourSearch``es the head runs over: same neighbours as brute force, same rows, same
    distances to given rows; the chunked one with chunks of 7 rows (the last one shorter)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 16, generator=generator) + 1.0
    queries = torch.randn(30, 16, generator=generator) * 2
    bank = MemoryBank(metric=metric).build(features)
    chunked = ChunkedNearest(bank.features, chunk=7, metric=metric)
    unit = (lambda x: F.normalize(x, dim=-1)) if metric == "cosine" else (lambda x: x)
    brute = torch.cdist(unit(queries).double(), unit(features).double()).topk(k, dim=1, largest=False)
    some = torch.tensor([[0, 199], [6, 7], [13, 100]])
    for search in (bank, chunked):
        distances, indices = search.search(queries, k)
        assert torch.equal(indices, brute.indices), type(search).__name__
        torch.testing.assert_close(distances.double(), brute.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(search.rows(some), bank.features[some], rtol=0, atol=1e-5)
        expected = torch.cdist(unit(queries[:3]).double()[:, None], bank.features[some].double()).squeeze(1)
        torch.testing.assert_close(search.distances(queries[:3], some).double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ PyTorch == export graph


@pytest.fixture(scope="module")
def resnet18() -> TorchvisionCNN:
    return TorchvisionCNN(arch="resnet18", layers=["layer2"], pretrained=False)


def _images(size: int, count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny_patchcore(extractor: TorchvisionCNN, **scoring) -> PatchCore:
    model = PatchCore(extractor, PatchEmbedder(embed_dim=32), GreedyCoresetSampler(ratio=0.5),
                      scoring=ScoringHead(**scoring), progress=False)
    train = [{"image": image, "label": 0} for image in _images(64, 3)]
    model.fit(torch.utils.data.DataLoader(train, batch_size=3))
    return model


@pytest.mark.parametrize("scoring", [
    {},  # max, Euclidean
    {"distance": "squared", "num_neighbors": 3},
    {"reweight_neighbors": 3, "num_neighbors": 2},  # Eq. 7
    {"distance": "cosine"},
    {"distance": "cosine", "reweight_neighbors": 4},
    {"image_score": "top_percent", "top_percent": 10.0, "blur_sigma": 2.0},
], ids=["max", "squared-k3", "eq7-k2", "cosine", "cosine-eq7", "top_percent"])
def test_pytorch_and_export_graph_score_alike(resnet18, scoring) -> None:
    """The exported module (as traced into ONNX/OpenVINO/TorchScript; tests/test_export.py runs those) gives
    ``PatchCore.score``'s scores and maps: one scoring head, over a search in 11-row chunks."""
    model = _tiny_patchcore(resnet18, **scoring)
    graph = ExportablePatchCore(model, chunk=11, input_dtype="float32").eval()
    floats = _images(64, 3, seed=5)
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    expected_scores, expected_maps = model.score((floats - mean) / std)
    with torch.no_grad():
        scores, maps = graph(floats)
    scale = expected_scores.abs().max()
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=1e-5 * expected_maps.abs().max())
    assert graph.scoring is model.scoring  # the model's own head, not a copy of its settings
    if scoring.get("reweight_neighbors"):  # Eq. 7 really reweights (the weight is below 1)
        plain = _tiny_patchcore(resnet18, **{**scoring, "reweight_neighbors": None}).score((floats - mean) / std)[0]
        assert bool((expected_scores < plain).all())


# ------------------------------------------------------------------------------ through PatchCore.score


def test_cosine_patch_scores_equal_brute_force(resnet18) -> None:
    model = _tiny_patchcore(resnet18, distance="cosine")
    images = _images(64, 2, seed=5)
    scores, _ = model.score(images)
    features, _ = model.embed(images)
    cosine = 1 - F.normalize(features, dim=-1) @ F.normalize(model.bank.features, dim=-1).T
    torch.testing.assert_close(scores, cosine.min(dim=-1).values.max(dim=1).values, rtol=1e-4, atol=1e-5)


def test_top_percent_image_score(resnet18) -> None:
    grid = 8 * 8  # resnet18 layer2 at 64 px
    plain = _tiny_patchcore(resnet18)
    images = _images(64, 3, seed=5)
    expected, expected_maps = plain.score(images)
    scores, maps = _tiny_patchcore(resnet18, image_score="top_percent", top_percent=100 / grid).score(images)
    torch.testing.assert_close(scores, expected)  # one patch out of N: the maximum
    torch.testing.assert_close(maps, expected_maps)
    ten = _tiny_patchcore(resnet18, image_score="top_percent", top_percent=10.0)
    features, _ = plain.embed(images)
    patch_scores = torch.cdist(features, plain.bank.features[None]).min(dim=-1).values  # brute force [3, 64]
    top = patch_scores.sort(dim=1, descending=True).values[:, : int(grid * 0.1)]  # 6 of 64 patches
    torch.testing.assert_close(ten.score(images)[0], top.mean(dim=1), rtol=1e-4, atol=1e-5)
