"""Config -> the model for a category: the one build of main.py's Harness and of selection's proxy score.

Both paths must fit the same model from the same config, or selection would score something main.py does not
run. So the steps live here once: the extractor for the category (a fine-tuned backbone's per-category
checkpoint, every one checked before any work), the crop fitted to an extractor with a fixed input size (CLIP
ViTs, the @336 models: their position embeddings dictate it), ``instantiate(cfg.model)`` with that extractor
(its weights loaded once), and the check that the crop is large enough for the backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from omegaconf import DictConfig

from core.backbones import FeatureExtractor
from core.backbones.base import check_input_size
from core.data import MVTecLayout
from core.detector import Detector
from experiments.harness.backbones import per_category_backbones
from experiments.harness.components import build

log = logging.getLogger("patchcore")


class ModelBuilder:
    """The models of one config, category by category. ``layout`` is the run's dataset layout: its crop is set
    here when the extractor dictates one (so the preprocessing the caller then takes from it matches)."""

    def __init__(self, cfg: DictConfig, layout: MVTecLayout, device: torch.device, categories: Sequence[str]) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device
        self.uses_extractor = "extractor" in cfg.model  # the CAE has no backbone
        self.per_category = per_category_backbones(cfg, categories) if self.uses_extractor else None
        self.extractor: FeatureExtractor | None = None

    def model(self, category: str) -> Detector:
        """The model for ``category``: a new extractor when it is the first or the backbone is per category
        (else the one already built, its weights loaded once), a new model around it."""
        fresh = self.uses_extractor and (self.extractor is None or self.per_category is not None)
        if fresh:
            self.extractor = build(self.per_category[category] if self.per_category else self.cfg.backbone)
            self._fit_input_size(self.extractor)
        parts = {"extractor": self.extractor} if self.uses_extractor else {}
        model = build(self.cfg.model, device=str(self.device), **parts)  # every model setting checked here
        if fresh:  # a crop too small for the backbone: named now, not mid-fit
            embedder = getattr(model, "embedder", None)
            check_input_size(self.extractor, self.layout.image_size, getattr(embedder, "patch_size", 1))
        return model

    def _fit_input_size(self, extractor: FeatureExtractor) -> None:
        """Models with fixed position embeddings (CLIP ViTs, the @336 models) dictate the crop size."""
        input_size = getattr(extractor, "input_size", None)
        if input_size and input_size != self.layout.image_size:
            self.layout.image_size, self.layout.resize = input_size, round(input_size * 256 / 224)
            log.info("%s expects %d px inputs: using resize %d, crop %d", extractor.name, input_size,
                     self.layout.resize, self.layout.image_size)
