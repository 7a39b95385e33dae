"""The contract every extractor keeps: images in, one mid-level feature map per requested layer out.

Everything after the extractor (aggregation, coreset, scoring) only sees
``list[Tensor[B, C_i, h_i, w_i]]`` (shallow first), so a new backbone is one class in this
package and one YAML in ``conf/backbone/``. Each extractor stops its forward pass after the
deepest requested layer: deeper layers are removed, never computed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.imagenet import IMAGENET_MEAN, IMAGENET_STD

# Random-weight extractors are built under this seed, so a saved model that used
# `pretrained=false` is rebuilt with the very same weights when it is loaded again.
RANDOM_INIT_SEED = 0


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

    def weightless_kwargs(self) -> dict | None:
        """Overrides of ``spec()["kwargs"]`` that build the same network with random weights and without
        looking any up (no file, cache or download); None: this class cannot (then ``standalone`` tries a
        wrapped extractor). Each family overrides it."""
        return None

    def standalone(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(spec, state_dict)``: a spec that ``build_extractor`` turns into this network without looking up
        any weights, and the weights that load into it strictly, giving the same features. A self-contained
        saved model stores both. A wrapper (one extractor inside, whose forward is the wrapped one's, as a
        fine-tuned backbone) gives its wrapped extractor's."""
        overrides = self.weightless_kwargs()
        if overrides is not None:
            spec = self.spec()
            spec["kwargs"] = {**spec["kwargs"], **overrides}
            return spec, self.state_dict()
        inner = [child for child in self.children() if isinstance(child, FeatureExtractor)]
        if len(inner) == 1:
            return inner[0].standalone()
        raise NotImplementedError(f"{type(self).__name__} cannot rebuild its network without its weights source: "
                                  f"save the model with save_model=spec_only")

    def for_inference(self) -> FeatureExtractor:
        """A copy for scoring only, never for training: BatchNorm folded into the convolution before it and
        weights in channels-last layout, which oneDNN runs faster on a CPU. Same outputs to float
        rounding (tests/test_backbones.py); feed it channels-last images (``PatchCore.embed`` does)."""
        fast = copy.deepcopy(self).eval()  # deepcopy may reset training flags (GraphModule): eval again
        fast.fold_batchnorm()
        return fast.to(memory_format=torch.channels_last)

    def fold_batchnorm(self) -> None:
        """Fold eval-mode BatchNorm into the preceding convolutions, in place. The default handles
        wrappers (extractors holding another extractor); backbones with BatchNorm override it."""
        for child in self.children():
            if isinstance(child, FeatureExtractor):
                child.fold_batchnorm()


def seeded_random_init(build):
    """``build()`` under ``RANDOM_INIT_SEED``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build()
