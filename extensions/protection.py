"""What fine-tuning must not take away from the pretrained weights, and the switches that protect it.

PatchCore works because ImageNet features are generic: a nominal-only objective can make them
specific (a new bias) or collapse them (lost expressivity). Four protections, each a config switch:

- ``frozen_stages`` (mmdetection's convention): -1 trains everything, 0 freezes the stem, k freezes the
  stem and stages 1..k; ``all_but_last`` freezes everything but the last stage PatchCore uses (the
  stem and stages 1..2 on every backbone here: only ``layer3`` / EfficientNet blocks 5-10 train).
  Stage k is the part of the network whose output has stride 2**(k+1), so stage numbers mean the same on
  every backbone: ResNet/WRN ``layer1..layer3``; EfficientNet-Lite0 blocks
  1-2, 3-4 and 5-10 (block 0 still runs at stride 2 and belongs to the stem). PatchCore's layers end
  stages 2 and 3 on both (``layer2``/``layer3``, ``blocks.4``/``blocks.10``). Frozen modules are kept
  in eval mode and out of the optimiser.
- ``freeze_bn``: every BatchNorm stays in eval mode, so its running statistics remain the ImageNet ones
  (a few hundred images of one product are a poor estimate of them, and PatchCore's test-time
  features use them). ``train_bn_affine`` says whether the BatchNorm scale/shift of *unfrozen* stages
  is still trained (default yes: it is part of the stage).
- a low learning rate (the optimiser's business, see training.py);
- L2-SP (Li et al., ICML 2018): ``l2sp_weight / 2 * ||w - w0||^2`` over the trainable backbone
  weights, pulling them toward the pretrained ``w0`` rather than toward zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.backbones import EfficientNetLite, FeatureExtractor

_BATCHNORM = nn.modules.batchnorm._BatchNorm
ALL_BUT_LAST = "all_but_last"


def check_frozen_stages(value: int | str) -> int | str:
    """The one check of ``method.train.frozen_stages``' form (its fit to a backbone: ``Protection``)."""
    if value == ALL_BUT_LAST or (isinstance(value, int) and not isinstance(value, bool) and value >= -1):
        return value
    raise ValueError(f"method.train.frozen_stages={value!r}: use -1 (train the whole backbone), 0 (freeze the "
                     f"stem), k >= 1 (the stem and stages 1..k) or {ALL_BUT_LAST} (train only the last stage "
                     "PatchCore uses)")


def stages(extractor: FeatureExtractor) -> list[list[nn.Module]]:
    """``[stem, stage 1, stage 2, ...]`` of the (truncated) extractor: stage k ends at stride 2**(k+1)."""
    if isinstance(extractor, EfficientNetLite):
        groups: list[list[nn.Module]] = [[extractor.stem]]
        stride = extractor.stem[0].stride[0]
        for block in extractor.blocks:
            stride *= block._depthwise_conv.stride[0]
            index = max(0, int(math.log2(stride)) - 1)  # stride 2 -> stem, 4 -> stage 1, 8 -> stage 2 ...
            while len(groups) <= index:
                groups.append([])
            groups[index].append(block)
        return groups
    body = getattr(extractor, "body", None)
    if body is not None and hasattr(body, "conv1") and hasattr(body, "bn1"):  # torchvision ResNet family
        layers = [getattr(body, f"layer{i}") for i in range(1, 5) if hasattr(body, f"layer{i}")]
        return [[body.conv1, body.bn1], *[[layer] for layer in layers]]
    raise ValueError(
        f"no stage rule for backbone {getattr(extractor, 'name', type(extractor).__name__)}: "
        "fine-tuning knows torchvision ResNets/WideResNets and EfficientNet-Lite. "
        "Use method.train.frozen_stages=-1 to train it whole, or add a rule in extensions/protection.py"
    )


class Protection:
    """Applies the freezing rules to ``extractor`` and computes the L2-SP penalty.

    Build it while the extractor still holds its pretrained weights: they become ``w0``.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        frozen_stages: int | str = 1,
        freeze_bn: bool = True,
        train_bn_affine: bool = True,
        l2sp_weight: float = 0.0,
    ) -> None:
        check_frozen_stages(frozen_stages)
        if l2sp_weight < 0:
            raise ValueError(f"method.train.l2sp_weight={l2sp_weight} must be >= 0 (0 = off)")
        self.extractor = extractor
        self.freeze_bn = freeze_bn
        self.l2sp_weight = float(l2sp_weight)
        groups = stages(extractor) if frozen_stages != -1 else []
        if frozen_stages == ALL_BUT_LAST:
            frozen_stages = len(groups) - 2
        if frozen_stages >= 0 and frozen_stages + 1 >= len(groups):
            raise ValueError(
                f"method.train.frozen_stages={frozen_stages} freezes every stage {extractor.name} computes "
                f"(stem + {len(groups) - 1} stages up to its deepest PatchCore layer): nothing would be "
                f"fine-tuned. Use at most {len(groups) - 2}."
            )
        self.frozen_modules = [module for group in groups[: frozen_stages + 1] for module in group]
        for module in self.frozen_modules:
            module.requires_grad_(False)
        if not train_bn_affine:
            for module in extractor.modules():
                if isinstance(module, _BATCHNORM):
                    module.requires_grad_(False)
        self.reference = {
            name: param.detach().clone() for name, param in extractor.named_parameters() if param.requires_grad
        }
        # ||w0|| over every parameter of the extractor (PatchCore's layers and all below them, frozen ones too):
        # the one denominator of weight_distance_rel, so arms that train different stages compare
        self.start_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in extractor.parameters()))

    def parameters(self) -> list[nn.Parameter]:
        """The backbone parameters that are fine-tuned."""
        return [param for param in self.extractor.parameters() if param.requires_grad]

    def train_mode(self) -> None:
        """``extractor.train()``, except frozen stages and (with ``freeze_bn``) every BatchNorm stay in eval."""
        self.extractor.train()
        for module in self.frozen_modules:
            module.eval()
        if self.freeze_bn:
            for module in self.extractor.modules():
                if isinstance(module, _BATCHNORM):
                    module.eval()

    def penalty(self) -> torch.Tensor:
        """L2-SP: ``l2sp_weight / 2 * sum ||w - w0||^2`` over the trainable backbone weights."""
        params = dict(self.extractor.named_parameters())
        device = next(iter(params.values())).device
        if self.l2sp_weight == 0 or not self.reference:
            return torch.zeros((), device=device)
        total = sum((params[name] - ref.to(device)).pow(2).sum() for name, ref in self.reference.items())
        return 0.5 * self.l2sp_weight * total

    @torch.no_grad()
    def weight_distance(self) -> dict[str, float]:
        """``||w - w0||_2`` over the trainable backbone weights (the L2-SP term's root, unweighted; frozen ones do
        not move), and relative to ``||w0||_2`` over every extractor parameter (frozen included): how far
        fine-tuning has moved the weights PatchCore's features come from."""
        params = dict(self.extractor.named_parameters())
        moved = sum(float((params[name] - ref).double().pow(2).sum()) for name, ref in self.reference.items())
        distance = moved**0.5
        return {"weight_distance": distance,
                "weight_distance_rel": distance / self.start_norm if self.start_norm > 0 else 0.0}

    def to(self, device: torch.device | str) -> Protection:
        self.reference = {name: ref.to(device) for name, ref in self.reference.items()}
        return self
