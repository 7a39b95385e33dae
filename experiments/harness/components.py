"""The Hydra side of building a run's parts, shared by every entry point: config node -> object, and the
compute device. (core/ knows nothing of Hydra; this is where a config node becomes a call.)"""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate


def build(node, **kwargs):
    """``instantiate``, re-raising the component's own error: its message names the setting to fix
    (Hydra's wrapper would bury it under the instantiation trace)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if error.__cause__ is not None:
            raise error.__cause__ from None
        raise


def resolve_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda`` -> a torch device; ``auto`` takes the GPU where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: choose auto, cpu or cuda")
    return torch.device(name)
