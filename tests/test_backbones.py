"""Extractors: shapes, early exit, real EfficientNet-Lite0 weights, clear errors when weights are missing."""

import pytest
import torch
from torchvision.models import get_model

from core.backbones import EfficientNetLite, TorchvisionCNN, WeightsNotFoundError


@pytest.mark.parametrize(
    ("arch", "channels"), [("wide_resnet50_2", (512, 1024)), ("resnet18", (128, 256))]
)
def test_random_weight_cnn_feature_shapes_and_early_exit(arch: str, channels: tuple[int, int]) -> None:
    extractor = TorchvisionCNN(arch, ["layer2", "layer3"], pretrained=False).eval()
    with torch.no_grad():
        maps = extractor(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, channels[0], 8, 8), (1, channels[1], 4, 4)]
    module_names = {name for name, _ in extractor.named_modules()}
    assert not any(name.startswith(("body.layer4", "body.fc", "body.avgpool")) for name in module_names)


def test_random_weights_are_reproducible() -> None:
    first = TorchvisionCNN("resnet18", ["layer2"], pretrained=False)
    second = TorchvisionCNN("resnet18", ["layer2"], pretrained=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_layer_lists_the_stages() -> None:
    with pytest.raises(ValueError, match="layer9.*layer4"):
        TorchvisionCNN("resnet18", ["layer9"], pretrained=False)


def test_missing_weights_offline_message(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(WeightsNotFoundError) as error:
        TorchvisionCNN("wide_resnet50_2", ["layer2", "layer3"], pretrained=True)
    message = str(error.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "TORCH_HOME" in message and "backbone.pretrained=false" in message
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in message


def test_corrupt_cached_weights_are_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the real weights")
    with pytest.raises(WeightsNotFoundError, match="corrupt.*f37072fd"):
        TorchvisionCNN("resnet18", ["layer2"], pretrained=True)


def test_explicit_weights_path(tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError, match="backbone.weights_path=.*nowhere.pth"):
        TorchvisionCNN("resnet18", ["layer2"], weights_path=str(tmp_path / "nowhere.pth"))
    torch.manual_seed(123)
    full = get_model("resnet18", weights=None)
    torch.save({"state_dict": full.state_dict()}, tmp_path / "r18.pth")
    extractor = TorchvisionCNN("resnet18", ["layer2"], weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(extractor.body.get_submodule("layer2.0.conv1").weight, full.layer2[0].conv1.weight)


def test_efficientnet_lite0_real_weights() -> None:
    extractor = EfficientNetLite().eval()
    with torch.no_grad():
        maps = extractor(torch.randn(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 28, 28), (2, 112, 14, 14)]
    assert len(extractor.blocks) == 11  # blocks 11-15 and the head are never built into the extractor
    random = EfficientNetLite(pretrained=False)
    pretrained_weight = extractor.stem[0].weight
    assert not torch.equal(pretrained_weight, random.stem[0].weight)


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("no network")


def _batchnorm_with_statistics(extractor: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine terms, so folding them is really tested."""
    generator = torch.Generator().manual_seed(1)
    for module in extractor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)


@pytest.mark.parametrize("make", [lambda: EfficientNetLite(), lambda: EfficientNetLite(pretrained=False),
                                  lambda: TorchvisionCNN("resnet18", ["layer1", "layer3"], pretrained=False)])
def test_inference_copy_gives_the_same_maps_without_batchnorm(make) -> None:
    extractor = make().eval()
    _batchnorm_with_statistics(extractor)
    fast = extractor.for_inference()
    images = torch.randn(3, 3, 96, 128)
    with torch.no_grad():
        expected = extractor(images)
        got = fast(images.contiguous(memory_format=torch.channels_last))
    for reference, maps in zip(expected, got, strict=True):
        assert maps.shape == reference.shape
        torch.testing.assert_close(maps, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())  # the original is untouched
    assert fast.spec() == extractor.spec()
    if isinstance(extractor, EfficientNetLite):  # stride-1 'same' padding moved into the convolution
        paddings = [m.static_padding for m in fast.modules() if hasattr(m, "static_padding")]
        assert sum(isinstance(p, torch.nn.ZeroPad2d) for p in paddings) < len(paddings) / 2
