"""The image tower of any open_clip model (CLIP ViT / ResNet, and timm-based towers such as SigLIP and EVA).

open_clip is imported inside the functions that use it, so that ``import core.backbones`` does not
pay for importing it. Only its public API is used: ``create_model`` builds the tower, each tower's
``prune_intermediate_layers`` (or the stages set to the identity for ResNets) drops what comes after the
deepest requested layer, and ``forward_intermediates`` returns the maps (class tokens dropped, NCHW).
Tested with open_clip 3.3.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from core.backbones.base import FeatureExtractor, seeded_random_init
from core.backbones.weights import WeightsNotFoundError, openclip_weights_file, read_checkpoint

log = logging.getLogger(__name__)

_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class OpenClipVisual(FeatureExtractor):
    """The image tower of any open_clip model (CLIP ViT/ResNet, SigLIP, EVA, ...) as a PatchCore extractor.

    * ViT towers (open_clip's ``VisionTransformer``): ``layers`` are 0-based transformer block indices;
      each block's token output loses its class token and becomes a ``[B, width, h, w]`` grid
      (14x14 for ViT-B-16 at 224 px), through open_clip's ``forward_intermediates``. Blocks after the
      deepest requested one, the final norm and the projection are pruned, so they are never computed.
    * ResNet towers (``RN50``, ``RN101``, ...): ``layers`` are stage names ``layer1`` ... ``layer4`` as for
      the torchvision CNNs; ``layer4`` (an identity then) and the attention pool are deleted unless requested.
    * timm towers (SigLIP, EVA, ...): ``layers`` are timm block indices, taken with timm's
      ``forward_intermediates``, which drops the class and register tokens.

    ``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...; downloaded into and read
    from the Hugging Face hub cache), a path to a checkpoint file (full CLIP or image tower only;
    .safetensors, or a torch file loaded with ``weights_only``), or None for random weights (built
    under a fixed seed, to try the pipeline only). ``mean``/``std``/``interpolation`` and
    ``input_size`` come from open_clip's preprocessing config of the tag (for a file or random weights:
    of the model's first listed tag), not ImageNet's.
    """

    interpolation = "bicubic"
    input_size: int | None = None

    def __init__(
        self,
        model: str = "ViT-B-16",
        layers: Sequence[int | str] | None = None,
        pretrained: str | None = "openai",
        quick_gelu: bool | None = None,
        cache_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        from open_clip.pretrained import list_pretrained_tags_by_model

        model = str(model)
        config = _model_config(model)
        pretrained = _tag_or_file(pretrained)
        tags = list_pretrained_tags_by_model(model)
        tag, weights_file = _resolve_weights(model, pretrained, tags, cache_dir)
        state = read_checkpoint(weights_file) if weights_file is not None else None

        self._set_preprocessing(model, tag, tags, mean, std)
        if quick_gelu is None:
            quick_gelu = _trained_with_quick_gelu(model, config, tag, tags, weights_file)
        visual = _build_tower(model, bool(quick_gelu))
        if state is not None:
            _load_visual_state(visual, state, weights_file, model)
        self.input_size = _square_input_size(visual, model)

        self.kind, self._depth, default_layers = _tower_kind(visual, model)
        layers = default_layers if layers is None else list(layers)
        if not layers:
            raise ValueError("backbone.layers is empty: name at least one layer")
        self.layers = self._check_layers(layers, model)
        self.name = name or model
        self._spec_kwargs = dict(
            model=model, layers=self.layers, pretrained=pretrained, quick_gelu=quick_gelu, cache_dir=cache_dir,
            mean=list(mean) if mean is not None else None, std=list(std) if std is not None else None,
            name=self.name,
        )
        self.visual = self._truncate(visual)
        if weights_file is None:
            log.warning("open_clip %s with random weights (backbone.pretrained=null): only to try the pipeline, "
                        "its anomaly scores mean nothing", model)

    def weightless_kwargs(self) -> dict:
        # mean/std explicit: without a tag they would come from the first listed tag's config
        return {"pretrained": None, "mean": list(self.mean), "std": list(self.std)}

    # -- construction steps

    def _set_preprocessing(self, model: str, tag: str | None, tags: list[str], mean, std) -> None:
        """mean/std/interpolation as the weights were trained with (explicit mean/std win)."""
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.pretrained import get_pretrained_cfg

        preprocess = get_pretrained_cfg(model, tag) if tag else (get_pretrained_cfg(model, tags[0]) if tags else {})
        self.mean = tuple(float(m) for m in (mean if mean is not None else preprocess.get("mean", OPENAI_DATASET_MEAN)))
        self.std = tuple(float(s) for s in (std if std is not None else preprocess.get("std", OPENAI_DATASET_STD)))
        self.interpolation = preprocess.get("interpolation", "bicubic")
        if self.interpolation not in ("bilinear", "bicubic"):
            self.interpolation = "bicubic"

    def _check_layers(self, layers: list, model: str) -> list:
        if self.kind == "resnet":
            wrong = [layer for layer in layers if str(layer) not in _RESNET_STAGES]
            if wrong:
                raise ValueError(f"backbone.layers: {wrong} are not stages of the ResNet tower {model}; "
                                 f"choose from {list(_RESNET_STAGES)} (e.g. [layer2, layer3])")
            layers = [str(layer) for layer in layers]
            indices = [_RESNET_STAGES.index(layer) for layer in layers]
        else:
            indices = [int(layer) if str(layer).strip().isdigit() else -1 for layer in layers]
            if any(not 0 <= i < self._depth for i in indices):
                what = "transformer blocks" if self.kind == "vit" else "blocks (stages for CNN towers)"
                raise ValueError(
                    f"backbone.layers={list(layers)}: {model} has {self._depth} {what}; give 0-based "
                    f"indices 0 ... {self._depth - 1} (e.g. [5, 8] for 12 blocks)"
                )
            layers = indices
        if indices != sorted(set(indices)):
            raise ValueError(f"backbone.layers={layers} must be distinct and ordered shallow to deep")
        self._indices = indices
        return layers

    def _truncate(self, visual: nn.Module) -> nn.Module:
        """Delete everything after the deepest requested layer (and the pooling/projection head)."""
        last = self._indices[-1]
        if self.kind == "vit":
            visual.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
            visual.attn_pool = visual.attn_pool_contrastive = None  # pooling only: never called for intermediates
        elif self.kind == "resnet":
            # ModifiedResNet has no prune_intermediate_layers, and its forward_intermediates (open_clip 3.3)
            # slices its stages only when stop_early is *false*: identities keep the deleted stages free
            # whichever way a version slices.
            for stage in _RESNET_STAGES[last + 1 :]:
                setattr(visual, stage, nn.Identity())
            visual.attnpool = None
        else:
            visual.trunk.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
            visual.head = nn.Identity()
        return visual

    # -- forward

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.kind != "resnet" and tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} ({self._spec_kwargs['model']}) needs {self.input_size}x{self.input_size} inputs (its "
                f"position embeddings are fixed), got {tuple(images.shape[-2:])}: set "
                f"dataset.image_size={self.input_size} and dataset.resize={round(self.input_size * 256 / 224)}"
            )
        if self.kind == "timm":
            return list(self.visual.trunk.forward_intermediates(
                images, indices=self._indices, stop_early=True, intermediates_only=True, output_fmt="NCHW"))
        # open_clip's own towers: ResNet index 0 is the stem, so stage i is index i + 1
        indices = self._indices if self.kind == "vit" else [i + 1 for i in self._indices]
        output = self.visual.forward_intermediates(images, indices=indices, stop_early=True, intermediates_only=True,
                                                   output_fmt="NCHW")
        return list(output["image_intermediates"])


# --------------------------------------------------------------------------- construction helpers


def _model_config(model: str) -> dict:
    """open_clip's config of a built-in model name, or an error listing close names."""
    import open_clip

    config = open_clip.get_model_config(model) if ":" not in model else None
    if config is None:
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5, cutoff=0.5)
        raise ValueError(
            f"backbone.model={model!r} is not an open_clip model name (hf-hub:/local-dir: schemas are not "
            f"supported: use the built-in name and backbone.pretrained=<tag or file>). "
            f"Close matches: {close}; all: open_clip.list_models()"
        )
    return config


def _tag_or_file(pretrained) -> str | None:
    """``pretrained`` as a string, or None for random weights (false, "", "none" and "null" included)."""
    if pretrained is False or (isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null")):
        return None
    return None if pretrained is None else str(pretrained)


def _resolve_weights(model: str, pretrained: str | None, tags: list[str],
                     cache_dir: str | None) -> tuple[str | None, Path | None]:
    """(tag, weights file): a tag, a file, or (None, None) for random initialisation."""
    from open_clip.pretrained import is_pretrained_cfg

    if pretrained is None:
        return None, None
    if is_pretrained_cfg(model, pretrained):
        return pretrained, openclip_weights_file(model, pretrained, cache_dir)  # fails fast when offline
    if Path(pretrained).expanduser().is_file():
        return None, Path(pretrained).expanduser()
    if "/" in pretrained or "\\" in pretrained or Path(pretrained).suffix:
        raise WeightsNotFoundError(
            f"backbone.pretrained={pretrained} is not a file. Pass an existing open_clip checkpoint file, "
            f"a pretrained tag of {model} ({tags or 'none listed'}), or null for random weights."
        )
    raise ValueError(
        f"backbone.pretrained={pretrained!r} is not a pretrained tag of open_clip model {model}: "
        f"choose one of {tags or '(none listed: pass a checkpoint file)'}, a checkpoint file path, "
        f"or null for random weights"
    )


def _trained_with_quick_gelu(model: str, config: dict, tag: str | None, tags: list[str],
                             weights_file: Path | None) -> bool:
    """The activation the tag was trained with; warns when a file may be OpenAI weights run with GELU."""
    from open_clip.pretrained import get_pretrained_cfg

    tag_cfg = get_pretrained_cfg(model, tag) if tag else {}
    quick_gelu = bool(tag_cfg.get("quick_gelu", config.get("quick_gelu", False)))
    if weights_file is not None and tag is None and not quick_gelu and "openai" in tags:
        log.warning("loading %s into %s with GELU; if these are OpenAI weights (trained with QuickGELU), "
                    "set backbone.quick_gelu=true", weights_file, model)
    return quick_gelu


# Only the image tower is kept: a one-layer, two-token text tower keeps building the discarded half cheap
# (CLIP builds its image tower first, so its random weights do not depend on the text tower).
_TINY_TEXT_TOWER = dict(context_length=2, vocab_size=2, width=8, heads=1, layers=1)


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs 'initialized randomly' on the root logger; the weights are loaded afterwards here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _build_tower(model: str, quick_gelu: bool) -> nn.Module:
    """The image tower alone, randomly initialised under the fixed seed, through ``open_clip.create_model``."""
    import open_clip

    def build() -> nn.Module:
        clip = open_clip.create_model(model, pretrained=None, load_weights=False, pretrained_image=False,
                                      pretrained_text=False, quick_gelu=quick_gelu, text_cfg=_TINY_TEXT_TOWER)
        return clip.visual

    notice = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        return seeded_random_init(build)
    finally:
        logging.getLogger().removeFilter(notice)


def _load_visual_state(visual: nn.Module, state: dict, path: Path, model: str) -> None:
    """Load a full CLIP checkpoint (``visual.*`` keys) or an image-tower-only state dict, strictly."""
    if any(key.startswith("visual.") for key in state):
        state = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsNotFoundError(
            f"weights file {path} does not fit the image tower of open_clip model {model} (wrong model name, "
            f"or another image size?): {str(error)[:1500]}"
        ) from error


def _square_input_size(visual: nn.Module, model: str) -> int:
    size = visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise ValueError(f"open_clip {model} expects {height}x{width} inputs; only square inputs are supported")
    return int(height)


def _tower_kind(visual: nn.Module, model: str) -> tuple[str, int, list]:
    """('vit' | 'resnet' | 'timm', number of blocks/stages, default layers)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        count = len(visual.transformer.resblocks)
    elif isinstance(visual, ModifiedResNet):
        return "resnet", len(_RESNET_STAGES), ["layer2", "layer3"]
    elif isinstance(visual, TimmModel) and hasattr(visual.trunk, "forward_intermediates"):
        trunk = visual.trunk
        count = len(getattr(trunk, "blocks", None) or getattr(trunk, "stages", None) or [])
        if not count or not hasattr(trunk, "prune_intermediate_layers"):
            raise ValueError(f"open_clip {model}: its timm tower {type(trunk).__name__} has no blocks/stages "
                             f"to take intermediate features from")
        return "timm", count, [count // 2 - 1, (3 * count) // 4 - 1] if count >= 4 else [count - 1]
    else:
        raise ValueError(f"open_clip {model}: image tower {type(visual).__name__} is not supported "
                         f"(supported: VisionTransformer, ModifiedResNet, timm towers with forward_intermediates)")
    # Default: halfway and three quarters deep, where WRN50's layer2/layer3 end.
    return "vit", count, [count // 2 - 1, (3 * count) // 4 - 1]
