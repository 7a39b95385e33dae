"""timm models as PatchCore extractors, with random weights (no download here).

Grids and channel counts of the shipped configs, maps equal to timm's own ``forward_intermediates``, prefix
(class and register) tokens dropped, the forward pass stopping after the deepest requested layer, weights
files and the offline error, each config end to end on the embedded textures set (the scoring variants
they use: tests/test_scoring.py).
"""

from __future__ import annotations

import json
import time

import pytest
import timm
import torch
from hydra.utils import instantiate

from core.backbones import TimmExtractor, WeightsNotFoundError
from core.backbones.base import seeded_random_init
from core.patchcore import PatchCore
from experiments.harness.fit_and_evaluate import run

DINO_S = "vit_small_patch14_dinov2.lvd142m"


@pytest.fixture(scope="module")
def dino_s() -> TimmExtractor:
    return TimmExtractor(DINO_S, [5, 8], pretrained=None).eval()


def _images(size: int, count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _calls(modules) -> tuple[list[int], list]:
    """Forward hooks recording which of ``modules`` ran (their index)."""
    ran: list[int] = []
    hooks = [module.register_forward_hook(lambda *args, i=i: ran.append(i)) for i, module in enumerate(modules)]
    return ran, hooks


# ----------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(("config", "size", "shapes", "stride"), [
    ("dinov2_vits14", 224, [(384, 16, 16)], 14),
    ("dinov2_vitb14", 56, [(768, 4, 4)], 14),
    ("convnext_tiny", 224, [(192, 28, 28), (384, 14, 14)], None),
    ("timm_efficientnet_b0", 224, [(40, 28, 28), (112, 14, 14)], None),
])
def test_config_grids_and_channels(make_config, config, size, shapes, stride) -> None:
    cfg = make_config(f"backbone={config}", "backbone.pretrained=null")
    assert make_config(f"backbone={config}").backbone.pretrained is True
    assert timm.is_model(cfg.backbone.model) and cfg.backbone.model in timm.list_pretrained()
    extractor = instantiate(cfg.backbone).eval()
    assert isinstance(extractor, TimmExtractor) and extractor.name == config
    with torch.no_grad():
        maps = extractor(_images(size, 1))
    assert [tuple(m.shape[1:]) for m in maps] == shapes
    assert extractor.channels == [c for c, _, _ in shapes] and extractor.input_size is None
    assert extractor.mean == (0.485, 0.456, 0.406) and extractor.interpolation == "bicubic"
    if stride:  # a ViT: any input size, one 14 px patch per grid cell (224 px: 16x16)
        assert extractor.strides == [stride] and extractor.layers == [11]
    else:
        assert extractor.strides == [8, 16]


# ------------------------------------------------------------------------- maps, tokens, early stop


def test_maps_equal_timms_forward_intermediates_and_stop_early(dino_s) -> None:
    reference = seeded_random_init(lambda: timm.create_model(DINO_S, dynamic_img_size=True)).eval()
    missing, unexpected = reference.load_state_dict(dino_s.model.state_dict(), strict=False)
    assert not unexpected  # the extractor's weights into the whole model; what it lacks is what was pruned:
    assert missing and {key.split(".")[0] + (f".{key.split('.')[1]}" if key.startswith("blocks") else "")
                        for key in missing} == {"blocks.9", "blocks.10", "blocks.11", "norm"}
    images = _images(112)
    with torch.no_grad():
        expected = reference.forward_intermediates(images, indices=[5, 8], intermediates_only=True, output_fmt="NCHW")
        ran, hooks = _calls(dino_s.model.blocks)
        maps = dino_s(images)
    for hook in hooks:
        hook.remove()
    assert [tuple(m.shape) for m in maps] == [(2, 384, 8, 8)] * 2
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs)
    assert ran == list(range(9)) and len(dino_s.model.blocks) == 9  # blocks 9..11 pruned, never computed
    assert isinstance(dino_s.model.norm, torch.nn.Identity) and isinstance(dino_s.model.head, torch.nn.Identity)


def test_register_and_class_tokens_are_dropped() -> None:
    """vit_small_patch14_reg4_dinov2: 1 class + 4 register tokens before the 8x8 patch tokens at 112 px."""
    extractor = TimmExtractor("vit_small_patch14_reg4_dinov2", [3], pretrained=None).eval()
    assert extractor.model.num_prefix_tokens == 5 and len(extractor.model.blocks) == 4
    raw = {}
    hook = extractor.model.blocks[3].register_forward_hook(lambda module, args, output: raw.__setitem__(3, output))
    with torch.no_grad():
        (feature_map,) = extractor(_images(112, 1))
    hook.remove()
    tokens = raw[3]
    assert tuple(tokens.shape) == (1, 5 + 64, 384)
    torch.testing.assert_close(feature_map, tokens[:, 5:].transpose(1, 2).reshape(1, 384, 8, 8))
    assert not torch.allclose(feature_map, tokens[:, :64].transpose(1, 2).reshape(1, 384, 8, 8), atol=1e-3)


def test_cnn_stops_after_the_deepest_stage() -> None:
    extractor = TimmExtractor("convnext_tiny", [0, 1], pretrained=None).eval()
    assert len(extractor.model.stages) == 2  # stages 2 and 3 pruned
    ran, hooks = _calls(extractor.model.stages)
    with torch.no_grad():
        maps = extractor(_images(64, 1))
    for hook in hooks:
        hook.remove()
    assert ran == [0, 1] and [tuple(m.shape[1:]) for m in maps] == [(96, 16, 16), (192, 8, 8)]
    effnet = TimmExtractor("efficientnet_b0", [2, 3], pretrained=None)
    assert len(effnet.model.blocks) == 5  # blocks 5 and 6 (stride 32) and the head pruned
    assert effnet.layers == [2, 3] and TimmExtractor("efficientnet_b0", pretrained=None).layers == [2, 3]


def test_bad_layers_and_names() -> None:
    with pytest.raises(ValueError, match=r"12 feature levels.*0 \.\.\. 11"):
        TimmExtractor(DINO_S, [12], pretrained=None)
    with pytest.raises(ValueError, match="shallow to deep"):
        TimmExtractor("convnext_tiny", [2, 1], pretrained=None)
    with pytest.raises(ValueError, match="not a timm model name.*convnext_tiny"):
        TimmExtractor("convnext_tinyy", [1], pretrained=None)
    with pytest.raises(ValueError, match="Invalid pretrained tag.*convnext_tiny.in12k_ft_in1k"):
        TimmExtractor("convnext_tiny.no_such_tag", [1], pretrained=None)
    with pytest.raises(ValueError, match=r"into the model name \(backbone.model=convnext_tiny.in1k\)"):
        TimmExtractor("convnext_tiny", [1], pretrained="in1k")


# ------------------------------------------------------------------------------ weights


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_CACHE=<empty tmp folder>, HF_HUB_OFFLINE=1; any download attempt fails the test."""
    import huggingface_hub

    import core.backbones.weights as weights

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the hub must not be contacted offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(weights, "_hub_unreachable", no_network)
    return tmp_path / "hub"


def test_offline_missing_weights_fail_at_start_up(offline_hub, make_config, tmp_path, textures_root) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as error:
        run(make_config("backbone=dinov2_vits14", "dataset=textures", f"dataset.root={textures_root}",
                        "category=brick", "logger=none"), tmp_path / "run")
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "timm model vit_small_patch14_dinov2 with tag 'lvd142m'" in message and "HF_HUB_OFFLINE=1" in message
    assert str(offline_hub / "models--timm--vit_small_patch14_dinov2.lvd142m") in message
    assert "https://huggingface.co/timm/vit_small_patch14_dinov2.lvd142m" in message
    assert "backbone.pretrained=/path/to/model.safetensors" in message and "backbone.pretrained=null" in message


def _other_weights(model: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.contiguous() for k, v in timm.create_model(model).state_dict().items()}


def test_cached_tag_is_used_offline_and_local_files(offline_hub, tmp_path) -> None:
    from safetensors.torch import save_file

    state = _other_weights("efficientnet_b0", 7)
    snapshot = offline_hub / "models--timm--efficientnet_b0.ra_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    save_file(state, str(snapshot / "model.safetensors"))
    extractor = TimmExtractor("efficientnet_b0.ra_in1k", [2, 3], pretrained=True)
    torch.testing.assert_close(extractor.model.conv_stem.weight, state["conv_stem.weight"])

    other = _other_weights("efficientnet_b0", 11)
    path = tmp_path / "b0.pth"
    torch.save({"state_dict": other}, path)
    from_file = TimmExtractor("efficientnet_b0", [2, 3], pretrained=str(path))
    torch.testing.assert_close(from_file.model.conv_stem.weight, other["conv_stem.weight"])
    assert from_file.spec()["kwargs"]["pretrained"] == str(path)
    with pytest.raises(WeightsNotFoundError, match="does not fit timm model convnext_tiny"):
        TimmExtractor("convnext_tiny", [1, 2], pretrained=str(path))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        TimmExtractor("efficientnet_b0", [2, 3], pretrained=str(tmp_path / "nowhere.safetensors"))


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize(("config", "extra", "ratio"), [
    ("dinov2_vits14", ("sweep=few_shot",), 1.0),  # AnomalyDINO's recipe: cosine, top 1%, no coreset, raw tokens
    ("dinov2_vitb14", ("coreset.ratio=0.5", "patchcore.embedder.embed_dim=64"), 0.5),
    ("convnext_tiny", ("coreset.ratio=0.5", "patchcore.embedder.embed_dim=64"), 0.5),
    ("timm_efficientnet_b0", ("coreset.ratio=0.5", "patchcore.embedder.embed_dim=64"), 0.5),
])
def test_config_runs_end_to_end(make_config, tmp_path, textures_root, config, extra, ratio) -> None:
    cfg = make_config(f"backbone={config}", *extra, "backbone.pretrained=null", "dataset=textures",
                      f"dataset.root={textures_root}", "category=brick", "dataset.train_limit=2",
                      "dataset.resize=64", "dataset.image_size=56", "logger=none", "viz.n=0", "save_model=true")
    results = run(cfg, tmp_path / "run")
    entry = results["categories"]["brick"]
    grid = 4 * 4 if "dinov2" in config else 7 * 7  # 56 px: 14 px patches, or stride 8 (the finest level)
    assert entry["n_train"] == 2 and entry["bank_size"] == int(2 * grid * ratio)
    assert 0.0 <= entry["image_auroc"] <= 1.0 and 0.0 <= entry["pixel_auroc"] <= 1.0
    saved = json.loads((tmp_path / "run" / "models" / "brick" / "model.json").read_text())
    assert saved["extractor"]["target"] == "core.backbones.TimmExtractor"
    model = PatchCore.load(tmp_path / "run" / "models" / "brick")  # the spec rebuilds the same random network
    assert model.extractor.spec() == saved["extractor"]
    assert model.scoring.distance == ("cosine" if "sweep=few_shot" in extra else "euclidean")


# ------------------------------------------------------------------------------ presets


def test_presets_name_the_new_backbones(make_config) -> None:
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        compare = compose("config", overrides=["sweep=compare_backbones"], return_hydra_config=True)
        few = compose("config", overrides=["sweep=few_shot"], return_hydra_config=True)
    assert {"dinov2_vits14", "convnext_tiny"} <= set(compare.hydra.sweeper.params["backbone"].split(","))
    params = few.hydra.sweeper.params
    assert params["dataset.train_limit"] == "1,2,4,8,16" and params["seed"] == "0,1,2"
    assert few.backbone.name == "dinov2_vits14" and few.patchcore.scoring.distance == "cosine"
    assert few.patchcore.scoring.image_score == "top_percent" and few.patchcore.scoring.top_percent == 1.0
