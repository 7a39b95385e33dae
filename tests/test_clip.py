"""open_clip image towers as PatchCore extractors, with random weights (no CLIP weights can be downloaded here).

Grid shapes and early exit for ViT-B-16 and RN50, the class token really dropped (checked against the
raw block output and open_clip's own ``forward_intermediates``), a tiny fit/predict/save/load run,
weights files (weights_only, no arbitrary pickles) and the offline error message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.pretrained import get_pretrained_cfg

import core.backbones.weights as weights
from core.backbones import OpenClipVisual, WeightsNotFoundError
from core.coreset import GreedyCoresetSampler
from core.features import PatchEmbedder
from core.patchcore import PatchCore


@pytest.fixture(scope="module")
def vit_b16() -> OpenClipVisual:
    return OpenClipVisual("ViT-B-16", [5, 8], pretrained=None).eval()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 with an empty hub cache under tmp_path; any download attempt fails the test."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub must not be contacted offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(weights, "_hub_unreachable", no_network)
    return tmp_path / "hf" / "hub"


def _other_tower_state(model: str, seed: int) -> dict[str, torch.Tensor]:
    """A full image-tower state dict of ``model`` with other random weights than the extractor's seed."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = open_clip.create_model(model, pretrained=None, pretrained_text=False).visual
    return {key: value.clone() for key, value in visual.state_dict().items()}


# ----------------------------------------------------------------------------------------- shapes


def test_vit_b16_grid_shapes_preprocessing_and_early_exit(vit_b16) -> None:
    with torch.no_grad():
        maps = vit_b16(torch.randn(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(2, 768, 14, 14), (2, 768, 14, 14)]
    assert vit_b16.input_size == 224 and vit_b16.layers == [5, 8] and vit_b16.name == "ViT-B-16"
    assert vit_b16.mean == OPENAI_DATASET_MEAN and vit_b16.std == OPENAI_DATASET_STD
    assert vit_b16.interpolation == "bicubic"
    assert len(vit_b16.visual.transformer.resblocks) == 9  # blocks 9..11 pruned, never computed
    assert vit_b16.visual.proj is None and isinstance(vit_b16.visual.ln_post, torch.nn.Identity)


def test_vit_rejects_other_input_sizes(vit_b16) -> None:
    with pytest.raises(ValueError, match=r"224x224.*dataset.image_size=224 and dataset.resize=256"):
        vit_b16(torch.randn(1, 3, 256, 256))


def test_rn50_stage_shapes_and_early_exit() -> None:
    extractor = OpenClipVisual("RN50", ["layer2", "layer3"], pretrained=None).eval()
    with torch.no_grad():
        maps = extractor(torch.randn(1, 3, 224, 224))
        small = extractor(torch.randn(1, 3, 64, 64))  # no position embedding left: any size works
    assert [tuple(m.shape) for m in maps] == [(1, 512, 28, 28), (1, 1024, 14, 14)]
    assert [tuple(m.shape) for m in small] == [(1, 512, 8, 8), (1, 1024, 4, 4)]
    assert extractor.input_size == 224 and extractor.interpolation == "bicubic"
    assert isinstance(extractor.visual.layer4, torch.nn.Identity) and extractor.visual.attnpool is None
    called = []
    hooks = [getattr(extractor.visual, stage).register_forward_hook(lambda *args, stage=stage: called.append(stage))
             for stage in ("layer1", "layer2", "layer3")]
    with torch.no_grad():
        extractor(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert called == ["layer1", "layer2", "layer3"]
    assert sum(p.numel() for p in extractor.visual.parameters()) < 10_000_000  # layer4's ~15M weights gone
    with pytest.raises(ValueError, match="layer1.*layer4"):
        OpenClipVisual("RN50", [5, 8], pretrained=None)


def test_bad_layers_and_model_names() -> None:
    with pytest.raises(ValueError, match="12 transformer blocks.*0 ... 11"):
        OpenClipVisual("ViT-B-16", [5, 12], pretrained=None)
    with pytest.raises(ValueError, match="shallow to deep"):
        OpenClipVisual("ViT-B-16", [8, 5], pretrained=None)
    with pytest.raises(ValueError, match="not an open_clip model name.*ViT-B-16"):
        OpenClipVisual("ViT-B-16x", [5, 8], pretrained=None)
    with pytest.raises(ValueError, match="not a pretrained tag.*openai"):
        OpenClipVisual("RN50", ["layer2"], pretrained="no_such_tag")


# ------------------------------------------------------------------------------ class token


def test_class_token_is_dropped(vit_b16) -> None:
    """Each map is the block's raw token output without token 0 (the class token), as a 14x14 grid."""
    raw = {}
    hooks = [vit_b16.visual.transformer.resblocks[i].register_forward_hook(
        lambda module, args, output, i=i: raw.__setitem__(i, output)) for i in (5, 8)]
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            maps = vit_b16(images)
    finally:
        for hook in hooks:
            hook.remove()
    for index, feature_map in zip((5, 8), maps):
        tokens = raw[index]
        assert tuple(tokens.shape) == (1, 197, 768)  # batch first: class token + 14*14 patches
        without_class = tokens[:, 1:].transpose(1, 2).reshape(1, 768, 14, 14)
        with_class = tokens[:, :-1].transpose(1, 2).reshape(1, 768, 14, 14)  # what keeping it would give
        torch.testing.assert_close(feature_map, without_class)
        assert not torch.allclose(feature_map, with_class, atol=1e-3)
        assert not torch.allclose(feature_map[0, :, 0, 0], tokens[0, 0], atol=1e-3)
    with torch.no_grad():  # open_clip's own implementation agrees
        reference = vit_b16.visual.forward_intermediates(images, indices=[5, 8], intermediates_only=True)
    for ours, theirs in zip(maps, reference["image_intermediates"]):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("model", ["ViT-B-16-SigLIP", "EVA02-B-16"])
def test_timm_towers_siglip_and_eva(model: str) -> None:
    """timm-based towers: SigLIP (no class token) and EVA02 (class token) give 14x14 grids of patch tokens."""
    extractor = OpenClipVisual(model, [2, 4], pretrained=None).eval()
    trunk = extractor.visual.trunk
    assert len(trunk.blocks) == 5  # pruned after the deepest requested block
    raw = {}
    hook = trunk.blocks[4].register_forward_hook(lambda module, args, output: raw.__setitem__(4, output))
    with torch.no_grad():
        maps = extractor(torch.randn(1, 3, 224, 224))
    hook.remove()
    assert [tuple(m.shape) for m in maps] == [(1, 768, 14, 14), (1, 768, 14, 14)]
    prefix = trunk.num_prefix_tokens
    assert prefix == (0 if "SigLIP" in model else 1)
    assert raw[4].shape[1] == 196 + prefix
    torch.testing.assert_close(maps[1], raw[4][:, prefix:].transpose(1, 2).reshape(1, 768, 14, 14))
    tag = "webli" if "SigLIP" in model else "merged2b_s8b_b131k"
    assert extractor.mean == tuple(get_pretrained_cfg(model, tag)["mean"])


# ------------------------------------------------------------------------------ fit / predict


def test_tiny_fit_predict_save_load(tmp_path) -> None:
    extractor = OpenClipVisual("ViT-B-16", [1, 2], pretrained=None, name="clip")
    generator = torch.Generator().manual_seed(0)
    train = [{"image": image, "label": 0} for image in torch.randn(3, 3, 224, 224, generator=generator)]
    test = torch.randn(2, 3, 224, 224, generator=generator)
    test[1, :, 64:128, 64:128] += 3.0  # a bright square
    model = PatchCore(extractor, PatchEmbedder(embed_dim=64), GreedyCoresetSampler(ratio=0.1), progress=False)
    report = model.fit(torch.utils.data.DataLoader(train, batch_size=2))
    assert model.grid == (14, 14) and report.n_patches == 3 * 196
    assert tuple(model.bank.features.shape) == (int(3 * 196 * 0.1), 64)
    predictions = model.predict(torch.utils.data.DataLoader([{"image": t, "label": i} for i, t in enumerate(test)]))
    assert predictions.maps.shape == (2, 224, 224)
    assert torch.isfinite(torch.from_numpy(predictions.image_scores)).all()
    assert torch.isfinite(torch.from_numpy(predictions.maps)).all()

    model.save(tmp_path / "model")  # the spec rebuilds the same random tower
    loaded = PatchCore.load(tmp_path / "model", expected_spec=model.spec())
    assert loaded.extractor.spec() == extractor.spec()
    for before, after in zip(model.score(test), loaded.score(test)):
        torch.testing.assert_close(before, after)


# ------------------------------------------------------------------------------ weights


def test_offline_missing_tag_fails_fast_with_instructions(offline_hub) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as error:
        OpenClipVisual("ViT-B-16", [5, 8], pretrained="openai")
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "ViT-B-16" in message and "'openai'" in message and "HF_HUB_OFFLINE=1" in message
    assert str(offline_hub / "models--timm--vit_base_patch16_clip_224.openai") in message
    assert "backbone.pretrained=/path/to/open_clip_model.safetensors" in message
    assert "https://huggingface.co/timm/vit_base_patch16_clip_224.openai" in message
    assert "backbone.quick_gelu=true" in message and "backbone.pretrained=null" in message


def test_unreachable_hub_and_failed_download(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_hub_unreachable", lambda: "cannot connect to huggingface.co:443 (test)")
    with pytest.raises(WeightsNotFoundError, match=r"RN50 with tag 'openai'.*cannot connect.*cache"):
        OpenClipVisual("RN50", ["layer2", "layer3"], pretrained="openai")

    import huggingface_hub

    def failing_download(repo_id, filename, **kwargs):
        raise OSError(f"no route to {repo_id}/{filename}")

    monkeypatch.setattr(weights, "_hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(WeightsNotFoundError) as error:
        OpenClipVisual("RN50", ["layer2", "layer3"], pretrained="openai")
    message = str(error.value)
    assert "downloading them failed" in message and "open_clip_pytorch_model.bin" in message
    assert str(tmp_path / "cache" / "models--timm--resnet50_clip.openai") in message


def test_cached_tag_is_used_offline(offline_hub) -> None:
    """A tag already in the hub cache loads without the network (a small timm tower: PE-Core-T-16-384)."""
    from safetensors.torch import save_file

    state = {f"visual.{key}": value.contiguous() for key, value in _other_tower_state("PE-Core-T-16-384", 7).items()}
    state["logit_scale"] = torch.tensor(4.6)  # text-side keys of a full CLIP checkpoint are ignored
    snapshot = offline_hub / "models--timm--PE-Core-T-16-384" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    save_file(state, str(snapshot / "open_clip_model.safetensors"))

    extractor = OpenClipVisual("PE-Core-T-16-384", [2, 4], pretrained="meta")
    weight = extractor.visual.trunk.patch_embed.proj.weight
    torch.testing.assert_close(weight, state["visual.trunk.patch_embed.proj.weight"])
    assert extractor.input_size == 384
    assert extractor.mean == tuple(get_pretrained_cfg("PE-Core-T-16-384", "meta")["mean"])


def test_local_checkpoint_file(tmp_path) -> None:
    """A full CLIP checkpoint file ('visual.*' keys, wrapped in 'state_dict') is loaded into the image tower."""
    tower = _other_tower_state("ViT-S-32", 11)
    path = tmp_path / "vit_s32.bin"
    torch.save({"state_dict": {**{f"visual.{k}": v.half() for k, v in tower.items()},
                               "text_projection": torch.zeros(2, 2)}}, path)
    extractor = OpenClipVisual("ViT-S-32", [3, 5], pretrained=str(path))
    torch.testing.assert_close(extractor.visual.conv1.weight, tower["conv1.weight"].half().float())
    assert extractor.spec()["kwargs"]["pretrained"] == str(path)
    with pytest.raises(WeightsNotFoundError, match="does not fit the image tower of open_clip model ViT-B-32"):
        OpenClipVisual("ViT-B-32", [3, 5], pretrained=str(path))
    with pytest.raises(WeightsNotFoundError, match="nowhere.bin is not a file.*openai"):
        OpenClipVisual("ViT-B-16", [5, 8], pretrained=str(tmp_path / "nowhere.bin"))


class _Payload:
    """Unpickling this would run code (create a marker file): a weights_only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*TorchScript archive:UserWarning")
def test_arbitrary_pickles_and_torchscript_are_refused(tmp_path) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Payload(marker)}, evil)
    with pytest.raises(WeightsNotFoundError, match="cannot read weights file"):
        OpenClipVisual("ViT-S-32", [3, 5], pretrained=str(evil))
    assert not marker.exists()

    scripted = tmp_path / "openai_style.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(WeightsNotFoundError, match="TorchScript archive"):
        OpenClipVisual("ViT-S-32", [3, 5], pretrained=str(scripted))


# ------------------------------------------------------------------------------ configs


def test_yaml_configs(make_config) -> None:
    cfg = make_config("backbone=clip", "backbone.pretrained=null")
    assert cfg.backbone.model == "ViT-B-16" and list(cfg.backbone.layers) == [5, 8] and cfg.backbone.name == "clip"
    extractor = instantiate(cfg.backbone)
    assert isinstance(extractor, OpenClipVisual) and extractor.layers == [5, 8] and extractor.input_size == 224
    assert make_config("backbone=clip").backbone.pretrained == "openai"
    large = make_config("backbone=clip", "backbone.model=ViT-L-14", "backbone.layers=[12,18]").backbone
    assert large.model == "ViT-L-14" and list(large.layers) == [12, 18]
    rn50 = make_config("backbone=clip_rn50").backbone
    assert rn50.model == "RN50" and list(rn50.layers) == ["layer2", "layer3"] and rn50.pretrained == "openai"
    assert make_config("backbone=clip", "backbone.pretrained=/models/ViT-B-16.bin").backbone.pretrained == (
        "/models/ViT-B-16.bin")
