"""The start-up validation pass: every numeric setting of a run checked, by name, before any work.

The components check their own settings when they are built, but several are only built per category
(the threshold's needs, the model's embedder) or fail with a bare ``TypeError`` on a string
(``threshold.k=abc``). This pass reads the config alone (nothing is built) and reports every bad
setting at once, each as ``<key>=<value> must be ...``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ANY = (lambda v: True, "")
# key -> (type, null allowed, range check, what the range is); a key absent from the config (another model,
# another rule) is not checked. A value of the wrong type says "must be a number" (or "an integer").
RULES: dict[str, tuple[str, bool, Callable[[float], bool], str]] = {
    "batch_size": ("integer", False, lambda v: v >= 1, ">= 1"),
    "num_workers": ("integer", False, lambda v: v >= 0, ">= 0"),
    "seed": ("integer", False, *_ANY),
    "viz.n": ("integer", True, lambda v: v >= 0, ">= 0"),
    "dataset.resize": ("integer", False, lambda v: v >= 1, "a positive number of pixels"),
    "dataset.image_size": ("integer", False, lambda v: v >= 1, "a positive number of pixels"),
    "dataset.train_limit": ("integer", True, lambda v: v >= 1, "null or >= 1"),
    "coreset.ratio": ("number", False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "coreset.proj_dim": ("integer", True, lambda v: v >= 1, "null or >= 1"),
    "coreset.start_points": ("integer", False, lambda v: v >= 1, ">= 1"),
    "patchcore.embed_dim": ("integer", True, lambda v: v >= 1, "null or >= 1"),
    "patchcore.patch_size": ("integer", False, lambda v: v >= 1, ">= 1"),
    "patchcore.num_neighbors": ("integer", False, lambda v: v >= 1, ">= 1"),
    "patchcore.blur_sigma": ("number", False, lambda v: v >= 0, ">= 0"),
    "storage.spill_above_gb": ("number", False, lambda v: v >= 0, ">= 0"),
    "storage.memory_budget_gb": ("number", True, lambda v: v > 0, "null or > 0 (GB)"),
    "threshold.k": ("number", False, lambda v: v >= 0, ">= 0 (standard deviations above the mean)"),
    "threshold.quantile": ("number", False, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "threshold.validation_fraction": ("number", False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "threshold.min_defect_area": ("integer", False, lambda v: v >= 0, ">= 0 (pixels)"),
}
_NOMINAL_RULES = ("NominalSigmaThreshold", "NominalQuantileThreshold")


def problems(cfg: DictConfig) -> list[str]:
    """Every bad setting of ``cfg``, one line each (empty when all are fine)."""
    found = []
    for key, (kind, nullable, in_range, what) in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False)
        if isinstance(value, str) and value == "<absent>" or (value is None and nullable):
            continue
        typed = _integer(value) if kind == "integer" else _number(value)
        if not typed:
            found.append(f"{key}={value if isinstance(value, str) else repr(value)} must be "
                         f"{'an integer' if kind == 'integer' else 'a number'}{f' {what}' if what else ''}")
        elif not in_range(value):
            found.append(f"{key}={value} must be {what}")
    resize, size = OmegaConf.select(cfg, "dataset.resize"), OmegaConf.select(cfg, "dataset.image_size")
    if _integer(resize) and _integer(size) and 0 < resize < size:
        found.append(f"dataset.image_size={size} must be <= dataset.resize={resize} (the crop is taken from the "
                     "resized image)")
    target = str(OmegaConf.select(cfg, "threshold._target_", default="") or "")
    fraction = OmegaConf.select(cfg, "threshold.validation_fraction", default=None)
    if target.endswith(_NOMINAL_RULES) and _number(fraction) and fraction == 0:
        found.append(f"threshold.validation_fraction=0 but threshold={target.rsplit('.', 1)[-1]} fits its threshold on "
                     "held-out nominal images: set threshold.validation_fraction > 0 (e.g. 0.1)")
    return found


def check(cfg: DictConfig) -> None:
    """Raise one ``ValueError`` listing every bad setting (see ``problems``)."""
    found = problems(cfg)
    if found:
        raise ValueError("bad settings, nothing was run:\n  " + "\n  ".join(found))


def check_writable(folder: Path, what: str) -> None:
    """Whether ``folder`` can be made and written, checked now (a probe file in its nearest existing
    ancestor, nothing left behind), so an unwritable output fails before the fit, not after it."""
    existing = folder.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} cannot be written: {existing} is a file, not a folder; choose another")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"{what} {folder} cannot be written ({error.strerror or error}): choose a writable "
                         "folder") from None
