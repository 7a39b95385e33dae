"""Both aggregations against hand-computed values and literal implementations of their definitions."""

import pytest
import torch
import torch.nn.functional as F

from core.features import PatchEmbedder, aggregate_locally, align_to_grid, pooling_matrix, unfold_neighbourhoods


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
    embedding, grid = PatchEmbedder(embed_dim=dim, aggregation="channel_mean")(maps)
    assert grid == (8, 8)
    torch.testing.assert_close(embedding, adaptive_reference(maps, dim), rtol=1e-5, atol=1e-6)


def test_patch_embedder_shapes_and_values() -> None:
    torch.manual_seed(0)
    shallow = torch.randn(2, 8, 6, 6)
    deep = torch.randn(2, 16, 3, 3)
    embedding, grid = PatchEmbedder(embed_dim=4, aggregation="channel_mean")([shallow, deep])
    assert grid == (6, 6) and embedding.shape == (2, 36, 4)
    # recompute by hand for one patch: per-layer pooling to 4, concat (8), pool to 4
    a = aggregate_locally(shallow)[1, :, 2, 3]
    b = align_to_grid(aggregate_locally(deep), (6, 6))[1, :, 2, 3]
    per_layer = torch.cat([F.adaptive_avg_pool1d(a[None], 4), F.adaptive_avg_pool1d(b[None], 4)], dim=1)
    expected = F.adaptive_avg_pool1d(per_layer, 4)[0]
    torch.testing.assert_close(embedding[1, 2 * 6 + 3], expected)


def test_patch_embedder_keeps_all_channels_with_null_dim() -> None:
    embedding, _ = PatchEmbedder(embed_dim=None, aggregation="channel_mean")([torch.ones(1, 8, 4, 4),
                                                                               torch.ones(1, 16, 2, 2)])
    assert embedding.shape == (1, 16, 24)


@pytest.mark.parametrize("kwargs", [{"patch_size": 2}, {"embed_dim": 0}, {"aggregation": "mean"}])
def test_patch_embedder_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="patchcore"):
        PatchEmbedder(**kwargs)


def official_reference(maps: list[torch.Tensor], dim: int, patch_size: int = 3) -> torch.Tensor:
    """The official ``PatchCore._embed``, literally: unfold, interpolate every (channel, offset) of the deeper
    layers' neighbourhoods to the first grid, ``MeanMapper`` per layer, stack, ``Aggregator``."""
    grid = maps[0].shape[-2:]
    per_layer = []
    for feature_map in maps:
        unfolded = torch.nn.Unfold(patch_size, stride=1, padding=patch_size // 2)(feature_map)
        batch, values = unfolded.shape[:2]
        spatial = unfolded.reshape(batch * values, 1, *feature_map.shape[-2:])
        spatial = F.interpolate(spatial, size=grid, mode="bilinear", align_corners=False)
        patches = spatial.reshape(batch, values, -1).transpose(1, 2).reshape(-1, 1, values)  # [B*h*w, 1, p*p*C]
        per_layer.append(F.adaptive_avg_pool1d(patches, dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(len(per_layer[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, dim).reshape(maps[0].shape[0], -1, dim)


@pytest.mark.parametrize(
    ("channels", "dim", "patch_size"),
    [((512, 1024), 1024, 3), ((40, 112), 1024, 3), ((128, 256), 256, 3), ((24, 48, 96), 64, 5), ((8,), 16, 3),
     ((8, 16), 7, 1), ((8, 16), 100, 3)],
)
def test_official_embedding_matches_literal_definition(channels: tuple[int, ...], dim: int, patch_size: int) -> None:
    """Pooling on each layer's own grid and interpolating the pooled result (the fast order) equals
    interpolating the unfolded neighbourhoods first (the official order), for both application paths."""
    torch.manual_seed(0)
    maps = [torch.randn(2, count, 8 >> i, 9 >> i) for i, count in enumerate(channels)]
    embedding, grid = PatchEmbedder(dim, patch_size, "official")(maps)
    assert grid == (8, 9)
    torch.testing.assert_close(embedding, official_reference(maps, dim, patch_size), rtol=1e-5, atol=1e-6)


def test_official_embedding_uses_both_application_paths() -> None:
    """WRN50-like layers take the grouped convolution, EfficientNet-like ones the sparse product."""
    wide, narrow = PatchEmbedder(1024, 3, "official"), PatchEmbedder(1024, 3, "official")
    wide([torch.randn(1, 512, 4, 4), torch.randn(1, 1024, 2, 2)])
    narrow([torch.randn(1, 40, 4, 4), torch.randn(1, 112, 2, 2)])
    assert [layer.grouped for layer in next(iter(wide._projections.values()))] == [True, True]
    assert [layer.grouped for layer in next(iter(narrow._projections.values()))] == [False, False]


def test_official_embedding_is_channels_last_invariant() -> None:
    torch.manual_seed(0)
    maps = [torch.randn(2, 512, 6, 6), torch.randn(2, 1024, 3, 3)]
    embedder = PatchEmbedder(1024, 3, "official")
    fast = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    torch.testing.assert_close(embedder(fast)[0], embedder(maps)[0])


def test_official_raw_neighbourhood_values_hand_checked() -> None:
    """One channel, one layer, embed_dim 18 > 9 values: each output repeats one raw neighbourhood value
    (twice), then the single-layer aggregation is the identity."""
    toy = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    embedding, _ = PatchEmbedder(18, 3, "official")([toy])
    # position (1, 1): neighbourhood rows [0,1,2], [4,5,6], [8,9,10], each value twice
    assert embedding[0, 5].tolist() == [v for v in (0, 1, 2, 4, 5, 6, 8, 9, 10) for _ in range(2)]
    # corner (0, 0): zero padding gives zeros for the missing neighbours
    assert embedding[0, 0].tolist() == [v for v in (0, 0, 0, 0, 0, 1, 0, 4, 5) for _ in range(2)]


def test_official_null_dim_keeps_every_unfolded_value() -> None:
    torch.manual_seed(0)
    shallow, deep = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2)
    embedding, _ = PatchEmbedder(None, 3, "official")([shallow, deep])
    assert embedding.shape == (1, 16, 9 * 2 + 9 * 3)
    expected_deep = align_to_grid(unfold_neighbourhoods(deep).reshape(1, 27, 2, 2), (4, 4)).flatten(2)
    torch.testing.assert_close(embedding[0, :, :18], unfold_neighbourhoods(shallow)[0].T)
    torch.testing.assert_close(embedding[0, :, 18:], expected_deep[0].T)


def test_spec_round_trip_and_old_specs_mean_channel_mean() -> None:
    embedder = PatchEmbedder(64, 5, "official")
    assert embedder.spec() == {"embed_dim": 64, "patch_size": 5, "aggregation": "official"}
    assert PatchEmbedder.from_spec(embedder.spec()).spec() == embedder.spec()
    assert PatchEmbedder.from_spec({"embed_dim": 32, "patch_size": 3}).aggregation == "channel_mean"
    assert PatchEmbedder().aggregation == "official"
