"""Rebuilding an extractor from a saved ``spec()`` without trusting the file it came from.

A saved model (``model.json``) or a fine-tuning checkpoint names its extractor as
``{"target": "<module>.<Class>", "kwargs": {...}}``. Such a file may have been tampered with, so
the target is resolved and checked to be a ``FeatureExtractor`` subclass from ``core.`` or
``extensions.`` *before* anything is called, and the kwargs must bind to that class's constructor.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping

from core.backbones.base import FeatureExtractor

TRUSTED_PACKAGES = ("core.", "extensions.")


class UntrustedSpecError(ValueError):
    """A saved extractor spec names something other than a known extractor class, or kwargs it does not take."""


def extractor_class(target: object) -> type[FeatureExtractor]:
    """The ``FeatureExtractor`` subclass ``target`` names; nothing is called but the module import."""
    if not isinstance(target, str) or not target.startswith(TRUSTED_PACKAGES) or "." not in target:
        raise UntrustedSpecError(
            f"refusing to build {target!r}: an extractor must be a FeatureExtractor class from core/ or extensions/"
        )
    module_name, _, class_name = target.rpartition(".")
    try:
        candidate = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UntrustedSpecError(f"refusing to build {target!r}: no such class ({error})") from error
    if not (isinstance(candidate, type) and issubclass(candidate, FeatureExtractor)):
        raise UntrustedSpecError(f"refusing to build {target!r}: it is not a FeatureExtractor class")
    return candidate


def checked_spec(spec: Mapping, overrides: Mapping | None = None) -> tuple[type[FeatureExtractor], dict]:
    """``(class, kwargs)`` of ``spec`` (``{"target", "kwargs"}``, ``overrides`` replacing those of its kwargs
    it has), nothing called: ``UntrustedSpecError`` naming the target when it is not a trusted extractor
    class or the kwargs do not fit its constructor."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("kwargs", {}), Mapping):
        raise UntrustedSpecError(
            f"refusing to build {spec!r}: an extractor spec is {{'target': ..., 'kwargs': {{...}}}}"
        )
    target = spec.get("target")
    cls = extractor_class(target)
    kwargs = dict(spec.get("kwargs", {}))
    for key, value in (overrides or {}).items():
        if key in kwargs:
            kwargs[key] = value
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise UntrustedSpecError(f"refusing to build {target!r} with kwargs {sorted(kwargs)}: {error}") from error
    return cls, kwargs


def build_extractor(spec: Mapping, overrides: Mapping | None = None) -> FeatureExtractor:
    """Build ``spec`` (``{"target", "kwargs"}``), with ``overrides`` replacing those of its kwargs it has;
    the class is instantiated only after ``checked_spec``'s checks."""
    cls, kwargs = checked_spec(spec, overrides)
    return cls(**kwargs)
