"""EfficientNet-Lite0 as a truncated feature extractor, with BatchNorm and TF 'same' padding folded for scoring."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from core.backbones.base import FeatureExtractor, seeded_random_init
from core.backbones.weights import efficientnet_lite0_weights_file, explicit_weights_file, load_state_dict


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
        model = seeded_random_init(lambda: EfficientNet.from_name("efficientnet-lite0"))
        if weights_path is not None:
            model.load_state_dict(load_state_dict(explicit_weights_file(weights_path)))
        elif pretrained:
            model.load_state_dict(load_state_dict(efficientnet_lite0_weights_file()))
        self.block_indices = [self._block_index(layer, len(model._blocks)) for layer in self.layers]
        if self.block_indices != sorted(set(self.block_indices)):
            raise ValueError(f"backbone.layers={self.layers} must be distinct and ordered shallow to deep")
        self.drop_connect_rate = model._global_params.drop_connect_rate or 0.0
        self.total_blocks = len(model._blocks)
        self.stem = nn.Sequential(model._conv_stem, model._bn0, model._swish)
        self.blocks = nn.ModuleList(model._blocks[: self.block_indices[-1] + 1])  # deeper blocks dropped

    def weightless_kwargs(self) -> dict:
        return {"pretrained": False, "weights_path": None}

    @staticmethod
    def _block_index(layer: str, count: int) -> int:
        match = re.fullmatch(r"blocks\.(\d+)", layer)
        if not match or int(match.group(1)) >= count:
            raise ValueError(f"backbone.layers: {layer!r} is not one of blocks.0 ... blocks.{count - 1}")
        return int(match.group(1))

    def fold_batchnorm(self) -> None:
        """Fold every BatchNorm, and move symmetric TF 'same' padding into the convolution itself
        (the ZeroPad2d copy of every feature map is a measurable share of the forward pass)."""
        self.eval()
        if isinstance(self.stem[1], nn.BatchNorm2d):
            self.stem[0] = fuse_conv_bn_eval(self.stem[0], self.stem[1])
            self.stem[1] = nn.Identity()
        for block in self.blocks:
            for conv, norm in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if isinstance(getattr(block, norm, None), nn.BatchNorm2d):
                    setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, norm)))
                    setattr(block, norm, nn.Identity())
        for module in self.modules():
            padding = getattr(module, "static_padding", None)
            if isinstance(module, nn.Conv2d) and isinstance(padding, nn.ZeroPad2d):
                left, right, top, bottom = padding.padding
                if left == right and top == bottom and module.padding == (0, 0):
                    module.padding, module.static_padding = (top, left), nn.Identity()

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
