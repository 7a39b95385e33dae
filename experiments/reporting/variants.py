"""Variant labels: each run's backbone plus the settings that vary between the report's runs where the run's
value differs from that backbone's default config (``conf/``), e.g. ``wrn50 (ratio=0.01)`` or
``effnet_lite0 (layers=blocks.4)``; settings every run shares are listed once in the report instead.
Random weights are always in the label. Seeds are not: runs that differ only in ``seed`` (or in settings
that do not change the numbers, ``NOT_VARIANT``) are repeats of one variant.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from experiments.harness.run_key import BOOKKEEPING, IDENTITY, PLACEMENT, is_ignored
from experiments.reporting.data import Run, flatten

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Never part of a variant label: the run's identity (category, seed), where data lives, and settings that
# do not change the numbers.
NOT_VARIANT = (*BOOKKEEPING, *IDENTITY)  # wherever they sit
NOT_VARIANT_TOP = PLACEMENT             # from the top only
# How a setting is named in a label where the last part of its dotted key would not say it.
LABEL_NAMES = {"coreset._target_": "sampler", "backbone.pretrained": "weights"}


def default_config(backbone: str, dataset: str) -> dict | None:
    """The config ``conf/`` gives this backbone and dataset (None when they are not in conf/)."""
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"backbone={backbone}", f"dataset={dataset}"])
        return OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # unknown group option, missing env var, hydra missing: fall back to the modal values
        return None


def format_value(key: str, value) -> str:
    if key == "backbone.pretrained":
        return "ImageNet" if value else "random"
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    if value is None:
        return "all" if key == "dataset.train_limit" else "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label(backbone: str, deviations: dict, without: tuple[str, ...] = ()) -> str:
    """``backbone (key=value, ...)`` over the deviations not in ``without``."""
    keys = [k for k in sorted(deviations) if k not in without]
    shorts = {k: LABEL_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    counts = Counter(shorts.values())
    parts = []
    for key in keys:
        if key == "backbone.pretrained" and deviations[key] is False:
            parts.append("random weights")
            continue
        name = shorts[key] if counts[shorts[key]] == 1 else key
        parts.append(f"{name}={format_value(key, deviations[key])}")
    return f"{backbone} ({', '.join(parts)})" if parts else backbone


def label_variants(runs: list[Run]) -> None:
    """Fill ``deviations`` (settings that differ from the backbone's default) and ``variant`` of each run."""
    by_backbone: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_backbone.setdefault((run.backbone, run.dataset), []).append(run)
    # A key missing from a run's config was added to conf/ after the run: the run had its default.
    flats = {id(run): _variant_settings(run.config) for run in runs}
    varying = {key for key in set().union(*flats.values())
               if len({json.dumps(flat[key], sort_keys=True) for flat in flats.values() if key in flat}) > 1}
    for (backbone, dataset), group in by_backbone.items():
        defaults = default_config(backbone, dataset)
        reference = _variant_settings(defaults) if defaults is not None else {}
        for key in varying:
            if key not in reference or _is_interpolation(reference[key]):
                values = Counter(json.dumps(flats[id(run)][key], sort_keys=True) for run in group
                                 if key in flats[id(run)])
                reference[key] = json.loads(values.most_common(1)[0][0]) if values else None
        for run in group:
            flat = flats[id(run)]
            run.deviations = {k: flat[k] for k in varying if k in flat and flat[k] != reference[k]}
            if (run.config.get("backbone") or {}).get("pretrained") is False:
                run.deviations["backbone.pretrained"] = False  # always said: random weights are no result
            run.variant = label(backbone, run.deviations)


def _variant_settings(config: dict) -> dict:
    return {k: v for k, v in flatten(config).items()
            if not is_ignored(k, NOT_VARIANT) and not is_ignored(k, NOT_VARIANT_TOP, nested=False)}


def _is_interpolation(value) -> bool:
    return isinstance(value, str) and "${" in value


def sort_value(value):
    """A key that orders None < numbers < strings < lists."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool):
        return (1, int(value), "")
    if isinstance(value, (int, float)):
        return (1, value, "")
    return (2, 0, json.dumps(value))


def variant_order(runs: list[Run]) -> list[str]:
    """Variants by backbone (first seen), fewest deviations first, then by the deviating values."""
    first_seen = {}
    for run in runs:
        first_seen.setdefault(run.backbone, len(first_seen))
    keyed = {}
    for run in runs:
        keyed.setdefault(run.variant, (first_seen[run.backbone], len(run.deviations),
                                       [(k, sort_value(v)) for k, v in sorted(run.deviations.items())]))
    return sorted(keyed, key=lambda v: keyed[v])
