"""Any timm model as a PatchCore extractor: ViTs (DINOv2, EVA, DeiT, ...) and CNNs (ConvNeXt, EfficientNet, ...).

timm (tested with 1.0.31) gives one interface to both: ``prune_intermediate_layers`` drops what comes after
the deepest requested layer (blocks, final norm, head) and ``forward_intermediates`` returns one NCHW map
per requested layer, prefix (class and register) tokens dropped and tokens reshaped to the patch grid.
Models without that interface are built with ``features_only=True, out_indices=...``, which also stops
after the deepest requested feature level. timm is imported inside the functions that use it, so that
``import core.backbones`` does not pay for importing it.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from core.backbones.base import FeatureExtractor, seeded_random_init
from core.backbones.weights import WeightsNotFoundError, explicit_weights_file, timm_weights_file

log = logging.getLogger(__name__)

_INTERPOLATIONS = ("bilinear", "bicubic")


class TimmExtractor(FeatureExtractor):
    """A timm model (``arch`` or ``arch.tag``, e.g. ``vit_small_patch14_dinov2.lvd142m``) as an extractor.

    ``layers`` are 0-based indices of timm's feature levels (``model.feature_info``): transformer blocks for
    ViTs (a 16x16 grid at 224 px for patch-14 models, ``dynamic_img_size`` resampling the position
    embeddings to the input), stages for CNNs (``convnext_tiny``: 0 ... 3 at strides 4 ... 32). Default:
    the last block of a ViT (AnomalyDINO's choice), the stride-8 and stride-16 levels of a CNN (where
    WRN50's layer2/layer3 end, PatchCore's choice).

    ``pretrained``: true for the tag's weights from the Hugging Face hub cache (the tag in ``model``, or
    timm's default tag of the architecture), a path to a .safetensors/.pth state dict in timm's layout, or
    null for random weights (built under a fixed seed, to try the pipeline only). ``mean``/``std``/
    ``interpolation`` come from timm's pretrained config of the model; ``input_size`` is set only for
    models whose position embeddings fix it (and that cannot resample them).
    """

    input_size: int | None = None

    def __init__(
        self,
        model: str = "vit_small_patch14_dinov2.lvd142m",
        layers: Sequence[int] | None = None,
        pretrained: bool | str | None = True,
        cache_dir: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        model = str(model)
        config = _pretrained_config(model)
        weights_file = _resolve_weights(model, pretrained, cache_dir)  # fails fast when offline
        self._set_preprocessing(config)
        network, self.input_size = _build(model, config, weights_file)
        levels = network.feature_info
        indices = _check_layers(list(layers) if layers is not None else _default_layers(levels), len(levels), model)
        self.layers, self._indices = indices, indices
        self.channels = [levels[i]["num_chs"] for i in indices]
        self.strides = [levels[i]["reduction"] for i in indices]
        self.name = name or model.split(".")[0]
        self._spec_kwargs = dict(model=model, layers=self.layers, pretrained=_spec_value(pretrained),
                                 cache_dir=cache_dir, name=self.name)
        self.model, self.features_only = _truncate(network, model, indices, weights_file)
        if weights_file is None:
            log.warning("timm %s with random weights (backbone.pretrained=null): only to try the pipeline, "
                        "its anomaly scores mean nothing", model)

    def weightless_kwargs(self) -> dict:
        return {"pretrained": None}

    def _set_preprocessing(self, config) -> None:
        """mean/std/interpolation as the weights were trained with."""
        if config is not None:
            self.mean = tuple(float(m) for m in config.mean)
            self.std = tuple(float(s) for s in config.std)
            self.interpolation = config.interpolation if config.interpolation in _INTERPOLATIONS else "bicubic"

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.input_size and tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} ({self._spec_kwargs['model']}) needs {self.input_size}x{self.input_size} inputs (its "
                f"position embeddings are fixed), got {tuple(images.shape[-2:])}: set "
                f"dataset.image_size={self.input_size} and dataset.resize={round(self.input_size * 256 / 224)}"
            )
        if self.features_only:
            return list(self.model(images))
        return list(self.model.forward_intermediates(images, indices=self._indices, intermediates_only=True,
                                                     output_fmt="NCHW"))


# --------------------------------------------------------------------------- construction helpers


def _pretrained_config(model: str):
    """timm's pretrained config of ``model`` (None when it lists none), or an error listing close names."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(model.split(".")[0]):
        close = difflib.get_close_matches(model, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"backbone.model={model!r} is not a timm model name. Close matches: {close}; "
                         f"all: timm.list_models('*pattern*')")
    try:
        return get_pretrained_cfg(model)
    except RuntimeError as error:  # an unknown tag
        tags = timm.list_pretrained(f"{model.split('.')[0]}.*")
        raise ValueError(f"backbone.model={model!r}: {error} Tagged names: {tags}") from error


def _spec_value(pretrained):
    return None if pretrained is None or pretrained is False else pretrained


def _resolve_weights(model: str, pretrained, cache_dir: str | None) -> Path | None:
    """The weights file: the tag's (hub cache, downloaded when online), a given file, or None (random)."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return timm_weights_file(model, cache_dir)
    text = str(pretrained)
    if text.strip().lower() in ("", "none", "null"):
        return None
    if "/" not in text and "\\" not in text and not Path(text).suffix:
        raise ValueError(f"backbone.pretrained={text!r}: give true, a weights file path, or null; a timm tag goes "
                         f"into the model name (backbone.model={model.split('.')[0]}.{text})")
    return explicit_weights_file(text)


def _build(model: str, config, weights_file: Path | None) -> tuple[nn.Module, int | None]:
    """The whole network under the fixed seed, with the weights loaded by timm (strictly, through the model's
    own checkpoint filter). Models with fixed position embeddings get ``dynamic_img_size=True`` so that any
    input size works (224 px: a 16x16 grid for patch-14 models); those that cannot keep their input size."""
    import timm

    kwargs = {}
    if weights_file is not None:
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)))
    fixed = bool(config is not None and config.fixed_input_size)

    def create(**extra) -> nn.Module:
        try:
            return seeded_random_init(lambda: timm.create_model(model, **kwargs, **extra))
        except (RuntimeError, KeyError, ValueError) as error:
            if weights_file is None:
                raise
            raise WeightsNotFoundError(f"weights file {weights_file} does not fit timm model {model} (another model "
                                       f"or tag?): {str(error)[:1500]}") from error

    if fixed:
        try:
            return create(dynamic_img_size=True), None
        except TypeError as error:
            if "dynamic_img_size" not in str(error):
                raise
            return create(), int(config.input_size[-1])
    return create(), None


def _default_layers(levels) -> list[int]:
    """ViTs (every level at one stride): the last block; CNNs: the stride-8 and -16 levels (else the last)."""
    reductions = [info["reduction"] for info in levels]
    if len(set(reductions)) == 1:
        return [len(levels) - 1]
    last_at = {reduction: index for index, reduction in enumerate(reductions)}  # the deepest level per stride
    return [last_at[r] for r in (8, 16) if r in last_at] or [len(levels) - 1]


def _check_layers(layers: list, count: int, model: str) -> list[int]:
    if not layers:
        raise ValueError("backbone.layers is empty: name at least one layer")
    indices = [int(layer) if str(layer).strip().isdigit() else -1 for layer in layers]
    if any(not 0 <= i < count for i in indices):
        raise ValueError(f"backbone.layers={list(layers)}: timm {model} has {count} feature levels (blocks for "
                         f"ViTs, stages for CNNs); give 0-based indices 0 ... {count - 1}")
    if indices != sorted(set(indices)):
        raise ValueError(f"backbone.layers={indices} must be distinct and ordered shallow to deep")
    return indices


def _truncate(network: nn.Module, model: str, indices: list[int], weights_file: Path | None) -> tuple[nn.Module, bool]:
    """(the network without what follows the deepest requested layer, whether it is a features_only net)."""
    if hasattr(network, "prune_intermediate_layers") and hasattr(network, "forward_intermediates"):
        network.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        return network, False
    import timm

    # No forward_intermediates: timm's features_only wrapper collects its modules up to the deepest level.
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file))) if weights_file else {}
    features = seeded_random_init(lambda: timm.create_model(model, features_only=True, out_indices=indices, **kwargs))
    return features, True
