"""Resumable sweeps: a run is identified by a hash of its resolved config, and skipped when done.

``config_hash(config)`` hashes the resolved config (as stored under ``"config"`` in results.json)
without the keys that cannot change a result (``IGNORED_KEYS``: logging, progress bars, data-loader
workers, saved-map count, ``force``). A run whose ``results.json`` with the same hash and
``"complete": true`` already exists under one of the search roots is skipped unless ``force=true``;
an interrupted sweep re-run with the same command therefore only runs what is missing. Runs are looked
for in ``outputs/`` and ``multirun/`` (relative to the working directory) and in the new run's own
sweep folder (a single run: its own folder, for ``hydra.run.dir`` set by hand).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

# Top-level keys that do not change any number in results.json. Another key that only affects speed or
# bookkeeping (e.g. a feature-cache folder) belongs here too, or every cached run would look new.
IGNORED_KEYS = ("force", "logger", "progress", "num_workers", "viz")
DEFAULT_ROOTS = ("outputs", "multirun")
SKIPPED_FILE = "skipped.json"
_PRUNE = {"maps", "models", "wandb", ".hydra", ".submitit", "features"}


def hashable_config(config: Mapping) -> dict:
    """The resolved config without ``IGNORED_KEYS`` (plain containers, nothing else removed)."""
    plain = copy.deepcopy(dict(config))
    for key in IGNORED_KEYS:
        plain.pop(key, None)
    return plain


def config_hash(config) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``hashable_config(config)``.

    ``config`` is a resolved plain dict (``results["config"]``) or a DictConfig (resolved here).
    """
    if not isinstance(config, dict):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    text = json.dumps(hashable_config(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def iter_results(roots: Iterable[str | Path]) -> Iterator[Path]:
    """Every ``results.json`` below the roots (saved models, maps and W&B folders are not entered)."""
    seen: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in _PRUNE)
            if "results.json" in files:
                path = (Path(folder) / "results.json").resolve()
                if path not in seen:
                    seen.add(path)
                    yield path


def read_results(path: Path) -> dict | None:
    """The parsed record, or None when the file is unreadable (half-copied, hand-edited)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def results_hash(results: dict) -> str | None:
    """The run's config hash: the stored ``config_hash``, or recomputed for records made before it existed."""
    if results.get("config_hash"):
        return results["config_hash"]
    return config_hash(results["config"]) if isinstance(results.get("config"), dict) else None


def find_done(key: str, roots: Iterable[str | Path]) -> Path | None:
    """The newest complete ``results.json`` whose config hash is ``key``, or None."""
    found: list[tuple[float, Path]] = []
    for path in iter_results(roots):
        results = read_results(path)
        if results and results.get("complete") is True and results_hash(results) == key:
            found.append((path.stat().st_mtime, path))
    return max(found)[1] if found else None


def search_roots(run_dir: Path, sweep_dir: Path | None = None, cwd: Path | None = None) -> list[Path]:
    """Where earlier runs are looked for: outputs/, multirun/, and the sweep folder (a single run: its own)."""
    cwd = cwd or Path.cwd()
    return [*(cwd / name for name in DEFAULT_ROOTS), sweep_dir if sweep_dir is not None else run_dir]


def _sweep_dir() -> Path | None:
    """The multirun's sweep folder, or None for a single run (or outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        return Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    except (ImportError, ValueError):
        return None


def skip_if_done(cfg, run_dir: Path) -> Path | None:
    """The results.json that already holds this run (and a ``skipped.json`` note in ``run_dir``), or None.

    Always None with ``force=true``.
    """
    if cfg.get("force", False):
        return None
    key = config_hash(cfg)
    done = find_done(key, search_roots(run_dir, _sweep_dir()))
    if done is not None and done.parent != run_dir.resolve():
        from core.io import write_json_atomic

        note = "skipped: this config was already run (force=true re-runs it)"
        write_json_atomic(run_dir / SKIPPED_FILE, {"config_hash": key, "same_as": str(done), "note": note})
    return done
