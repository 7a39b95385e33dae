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


# The largest crop the start-up size check tries when looking for the smallest one that works.
LARGEST_PROBE = 1024


def gives_grid(extractor: FeatureExtractor, size: int, min_grid: int) -> bool:
    """Whether a ``size`` x ``size`` input gives every layer a non-empty map and the first (the patch grid) at
    least ``min_grid`` positions a side; a forward that fails for the size (a kernel larger than its input)
    counts as no."""
    was_training = extractor.training
    device = next(extractor.parameters(), torch.zeros(0)).device
    try:
        with torch.no_grad():
            maps = extractor.eval()(torch.zeros(1, 3, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        extractor.train(was_training)
    return all(min(m.shape[-2:]) >= 1 for m in maps) and min(maps[0].shape[-2:]) >= min_grid


def check_input_size(extractor: FeatureExtractor, image_size: int, min_grid: int) -> None:
    """Refuse a crop too small for the extractor (a failing forward, an empty map, a patch grid smaller than
    the patch), naming the smallest size that works, found by one-image forwards of tiny zero inputs (each
    output grows with the input, so a size that works means every larger one does). Cheap: a valid size is
    usually confirmed at 32 or 64 px. Extractors with a fixed ``input_size`` dictate the crop and are skipped."""
    if getattr(extractor, "input_size", None):
        return
    probe = 8
    while probe < image_size:
        if gives_grid(extractor, probe, min_grid):
            return
        probe *= 2
    if gives_grid(extractor, image_size, min_grid):
        return
    failing, working = image_size, None  # the smallest working size lies in (failing, working]
    probe = max(2 * image_size, 8)
    while probe <= LARGEST_PROBE and working is None:
        if gives_grid(extractor, probe, min_grid):
            working = probe
        else:
            failing, probe = probe, 2 * probe
    if working is None:
        return  # no size works: not a size problem; the run fails its own way
    while working - failing > 1:
        middle = (failing + working) // 2
        failing, working = (failing, middle) if gives_grid(extractor, middle, min_grid) else (middle, working)
    raise ValueError(f"dataset.image_size={image_size} is too small for backbone {extractor.name} (layers "
                     f"{extractor.layers}): the smallest crop that gives a {min_grid}x{min_grid} patch grid is "
                     f"{working} px; set dataset.image_size (and dataset.resize) to at least {working}")
