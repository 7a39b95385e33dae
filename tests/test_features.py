"""Local aggregation, alignment and channel pooling against hand-computed values."""

import pytest
import torch
import torch.nn.functional as F

from core.features import PatchEmbedder, aggregate_locally, align_to_grid, pooling_matrix


def test_local_aggregation_is_hand_computed_3x3_mean() -> None:
    toy = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    # [[0,1,2,3],[4,5,6,7],[8,9,10,11],[12,13,14,15]]
    out = aggregate_locally(toy, 3)
    assert out.shape == toy.shape
    # interior position (1,1): mean of 0,1,2,4,5,6,8,9,10 = 45/9 = 5
    assert out[0, 0, 1, 1].item() == pytest.approx(5.0)
    # interior (2,2): mean of 5,6,7,9,10,11,13,14,15 = 90/9 = 10
    assert out[0, 0, 2, 2].item() == pytest.approx(10.0)
    # corner (0,0): zero padding is counted, like the official unfold: (0+1+4+5)/9 = 10/9
    assert out[0, 0, 0, 0].item() == pytest.approx(10.0 / 9.0)
    # edge (0,2): (1+2+3+5+6+7)/9 = 24/9
    assert out[0, 0, 0, 2].item() == pytest.approx(24.0 / 9.0)


def test_alignment_bilinear_to_reference_grid() -> None:
    coarse = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    fine = align_to_grid(coarse, (4, 4))
    assert fine.shape == (1, 1, 4, 4)
    # align_corners=False: output (0,1) samples input x = (1 + 0.5) * 0.5 - 0.5 = 0.25 -> 0 + 0.25*4 = 1
    assert fine[0, 0, 0, 1].item() == pytest.approx(1.0)
    assert fine[0, 0, 0, 0].item() == pytest.approx(0.0)  # clamped at the border
    assert align_to_grid(coarse, (2, 2)) is coarse


def test_channel_pooling_matrix_values() -> None:
    x = torch.tensor([[1.0, 3.0, 5.0, 7.0]])
    assert (x @ pooling_matrix(4, 2).float()).tolist() == [[2.0, 6.0]]
    # upsampling repeats each input
    assert (x @ pooling_matrix(4, 8).float()).tolist() == [[1.0, 1.0, 3.0, 3.0, 5.0, 5.0, 7.0, 7.0]]


@pytest.mark.parametrize(("in_dim", "out_dim"), [(4, 2), (4, 8), (7, 3), (3, 7), (152, 1024), (1536, 1024), (5, 5)])
def test_pooling_matrix_is_adaptive_average_pooling(in_dim: int, out_dim: int) -> None:
    x = torch.randn(6, in_dim, dtype=torch.float64)
    expected = F.adaptive_avg_pool1d(x[:, None], out_dim)[:, 0]
    torch.testing.assert_close(x @ pooling_matrix(in_dim, out_dim), expected)


def adaptive_reference(maps: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The official code's order of operations, with torch's own pooling: per layer, then the concatenation."""
    grid = maps[0].shape[-2:]
    per_layer = []
    for feature_map in maps:
        patches = align_to_grid(aggregate_locally(feature_map), grid).flatten(2).transpose(1, 2)
        per_layer.append(F.adaptive_avg_pool1d(patches.reshape(-1, 1, patches.shape[-1]), dim))
    joined = torch.cat(per_layer, dim=-1)
    return F.adaptive_avg_pool1d(joined, dim).reshape(maps[0].shape[0], -1, dim)


@pytest.mark.parametrize(("channels", "dim"), [((40, 112), 1024), ((512, 1024), 1024), ((24, 48, 96), 64)])
def test_patch_embedder_matches_two_adaptive_poolings(channels: tuple[int, ...], dim: int) -> None:
    torch.manual_seed(0)
    maps = [torch.randn(2, count, 8 >> i, 8 >> i) for i, count in enumerate(channels)]
    embedding, grid = PatchEmbedder(embed_dim=dim)(maps)
    assert grid == (8, 8)
    torch.testing.assert_close(embedding, adaptive_reference(maps, dim), rtol=1e-5, atol=1e-6)


def test_patch_embedder_shapes_and_values() -> None:
    torch.manual_seed(0)
    shallow = torch.randn(2, 8, 6, 6)
    deep = torch.randn(2, 16, 3, 3)
    embedding, grid = PatchEmbedder(embed_dim=4)([shallow, deep])
    assert grid == (6, 6) and embedding.shape == (2, 36, 4)
    # recompute by hand for one patch: per-layer pooling to 4, concat (8), pool to 4
    a = aggregate_locally(shallow)[1, :, 2, 3]
    b = align_to_grid(aggregate_locally(deep), (6, 6))[1, :, 2, 3]
    per_layer = torch.cat([F.adaptive_avg_pool1d(a[None], 4), F.adaptive_avg_pool1d(b[None], 4)], dim=1)
    expected = F.adaptive_avg_pool1d(per_layer, 4)[0]
    torch.testing.assert_close(embedding[1, 2 * 6 + 3], expected)


def test_patch_embedder_keeps_all_channels_with_null_dim() -> None:
    embedding, _ = PatchEmbedder(embed_dim=None)([torch.ones(1, 8, 4, 4), torch.ones(1, 16, 2, 2)])
    assert embedding.shape == (1, 16, 24)


@pytest.mark.parametrize("kwargs", [{"patch_size": 2}, {"embed_dim": 0}])
def test_patch_embedder_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="patchcore"):
        PatchEmbedder(**kwargs)
