"""The Hydra side of building a run's parts, shared by every entry point: config node -> object, the
types of its settings, and the compute device. (core/ knows nothing of Hydra; this is where a config
node becomes a call.)

A setting's type is declared once, by the type hint of the constructor argument it feeds; its range once,
by the check in that constructor. ``type_problems`` reads the hints, so a ``coreset.ratio=abc`` is named
with every other mistyped setting at once instead of surfacing as a bare ``TypeError`` mid-build.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def build(node, **kwargs):
    """``instantiate``, re-raising the component's own error: its message names the setting to fix
    (Hydra's wrapper would bury it under the instantiation trace)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if error.__cause__ is not None:
            raise error.__cause__ from None
        raise


def fits(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def expected_kinds(hint: Any) -> tuple[list[type], bool] | None:
    """The plain kinds a hint allows and whether null is allowed; None for hints not checked here
    (objects, sequences, literals: their constructors check them)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    nullable = type(None) in options
    kinds = [option for option in options if option is not type(None)]
    if not kinds or any(kind not in KINDS for kind in kinds):
        return None
    return kinds, nullable


def _hints(target: str) -> dict[str, Any]:
    try:
        cls = get_class(target)
        return typing.get_type_hints(cls.__init__ if inspect.isclass(cls) else cls)
    except Exception:  # an unknown class is reported by the build itself, with Hydra's message
        return {}


def value_problems(values: Mapping[str, Any], hints: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``<prefix><key>=<value> must be an integer`` for every value its type hint does not allow (hints that
    are not plain kinds are left to the constructor)."""
    found = []
    for key, value in values.items():
        expected = expected_kinds(hints.get(key))
        if expected is None or (value is None and expected[1]) or any(fits(value, k) for k in expected[0]):
            continue
        shown = value if isinstance(value, str) else repr(value)
        what = " or ".join(KINDS[k] for k in expected[0]) + (" or null" if expected[1] else "")
        found.append(f"{prefix}{key}={shown} must be {what}")
    return found


def node_type_problems(node: DictConfig, path: str) -> list[str]:
    """``<path>.<key>=<value> must be an integer`` for every value of a ``_target_`` node (and of the nodes
    nested in it) that its constructor's type hints do not allow. Interpolated parts (``${backbone}``) are
    checked under their own name."""
    found, values = [], {}
    for key in node:
        if key == "_target_" or OmegaConf.is_interpolation(node, key) and OmegaConf.is_dict(node[key]):
            continue
        value = node[key]
        if OmegaConf.is_dict(value) and "_target_" in value:
            found += node_type_problems(value, f"{path}.{key}")
        else:
            values[key] = value
    return value_problems(values, _hints(str(node._target_)), f"{path}.") + found


def type_problems(cfg: DictConfig) -> list[str]:
    """Every mistyped setting of every part the run builds (each top-level node with a ``_target_``)."""
    found = []
    for key in cfg:
        if OmegaConf.is_interpolation(cfg, key):
            continue  # `model: ${patchcore}`: checked as patchcore
        node = cfg[key]
        if OmegaConf.is_dict(node) and "_target_" in node:
            found += node_type_problems(node, str(key))
    return found


def resolve_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda`` -> a torch device; ``auto`` takes the GPU where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: choose auto, cpu or cuda")
    return torch.device(name)
