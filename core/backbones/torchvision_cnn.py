"""Any torchvision classification CNN (ResNets, WideResNets, ...) as a truncated feature extractor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx.experimental.optimization import fuse as fuse_conv_batchnorm
from torchvision.models import get_model
from torchvision.models.feature_extraction import create_feature_extractor

from core.backbones.base import FeatureExtractor, seeded_random_init
from core.backbones.weights import explicit_weights_file, load_state_dict, torchvision_weights_file


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
        model = seeded_random_init(lambda: get_model(arch, weights=None))
        if weights_path is not None:
            model.load_state_dict(load_state_dict(explicit_weights_file(weights_path)))
        elif pretrained:
            model.load_state_dict(load_state_dict(torchvision_weights_file(arch, weights)))
        known = {name for name, _ in model.named_modules() if name}
        unknown = [layer for layer in self.layers if layer not in known]
        if unknown:
            top_level = [name for name, _ in model.named_children()]
            raise ValueError(f"backbone.layers: {unknown} not in {arch}; its stages are {top_level}")
        self.body = create_feature_extractor(model, return_nodes={layer: layer for layer in self.layers})

    def weightless_kwargs(self) -> dict:
        return {"pretrained": False, "weights_path": None}

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.body(images)
        return [outputs[layer] for layer in self.layers]

    def fold_batchnorm(self) -> None:
        # inplace: fuse would deepcopy, and deepcopy of a GraphModule resets its submodules to training mode
        self.body = fuse_conv_batchnorm(self.body.eval(), inplace=True, no_trace=True)
