"""Feature extractors (one module per family) and the acquisition of their pretrained weights.

    base.py             FeatureExtractor: the contract (a list of maps, shallow first; spec(); for_inference())
    torchvision_cnn.py  TorchvisionCNN: ResNets, WideResNets, ... truncated after the deepest layer
    efficientnet.py     EfficientNetLite: EfficientNet-Lite0 blocks
    openclip.py         OpenClipVisual: the image tower of an open_clip model (ViT, ResNet, timm towers)
    timm.py             TimmExtractor: any timm model (DINOv2 and other ViTs, ConvNeXt, EfficientNet, ...)
    weights.py          finding, verifying and downloading weights; the offline errors
    build.py            build_extractor: a saved spec back into an extractor, trusted classes only

Adding a backbone: subclass FeatureExtractor in a module of its own here, export it below, and add
a YAML to conf/backbone/ whose ``_target_`` is ``core.backbones.<Class>``.
"""

from core.backbones.base import RANDOM_INIT_SEED, FeatureExtractor
from core.backbones.build import UntrustedSpecError, build_extractor
from core.backbones.efficientnet import EfficientNetLite
from core.backbones.openclip import OpenClipVisual
from core.backbones.timm import TimmExtractor
from core.backbones.torchvision_cnn import TorchvisionCNN
from core.backbones.weights import WeightsNotFoundError

# Saved models, feature caches and fine-tuning checkpoints name an extractor by its import path
# (``spec()["target"]``). Giving the classes their public path keeps those names the same whichever
# module of this package a class lives in, so files written before a move still match.
for _cls in (FeatureExtractor, TorchvisionCNN, EfficientNetLite, OpenClipVisual, TimmExtractor):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "RANDOM_INIT_SEED",
    "EfficientNetLite",
    "FeatureExtractor",
    "OpenClipVisual",
    "TimmExtractor",
    "TorchvisionCNN",
    "UntrustedSpecError",
    "WeightsNotFoundError",
    "build_extractor",
]
