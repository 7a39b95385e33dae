"""Resumable sweeps: a run is identified by a hash of its resolved config, and skipped when done.

``config_hash(config)`` hashes the resolved config (as stored under ``"config"`` in results.json)
without the keys that cannot change a result (``BOOKKEEPING``: logging, progress bars, data-loader
workers, saved maps, ``force``, where fit-time features are spilled or cached). A run whose
``results.json`` with the same hash and ``"complete": true`` already exists under one of the search
roots is skipped unless ``force=true``; an interrupted sweep re-run with the same command therefore only
runs what is missing. Runs are looked for in ``outputs/`` and ``multirun/`` (relative to the working
directory) and in the new run's own sweep folder (a single run: its own folder, for ``hydra.run.dir``
set by hand).

The key groups below are the one list of "keys that do not matter" (the hash, the report's variant
labels and its setup section each skip a union of them); ``is_ignored`` and ``without`` read them with
nested (dotted) keys, so ``storage.cache_dir`` is skipped as surely as ``force``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

# Keys (dotted; a key covers everything below it, and is matched wherever it sits: patchcore.progress,
# cae.progress) that change no number in results.json: logging, progress, workers, saved maps, Hydra's own
# node, and where fit-time features are spilled or cached (the spill file
# and the cache hold the same values). Another key that only affects speed or bookkeeping belongs here too,
# or every cached run would look new. NOT the buffer dtype (storage.dtype / memory.dtype): float16 moves
# the scores.
BOOKKEEPING = ("force", "logger", "progress", "num_workers", "viz", "hydra",
               "storage.spill_dir", "storage.spill_above_gb", "storage.cache_dir",
               "memory.spill_dir", "memory.spill_above_gb", "memory.cache_dir",  # memory.*: records made before storage
               # whether the buffer spills (the same values either way); skipping unreadable files: a run that
               # skips nothing is the same run, one that does lists them in results.json (skipped_inputs)
               "storage.memory_budget_gb", "dataset.skip_unreadable")
# What a run is *of* rather than how it is set up: one variant's runs differ in these (coreset.seed,
# cae.seed: wherever they sit).
IDENTITY = ("category", "seed")
# Where the data lives, names, and settings that change a number at most by float rounding (device,
# batch size) or not at all (save_model): not part of a variant's label, but kept in the hash. Matched
# from the top only (nested=False): cae.batch_size is the CAE's training batch, a real setting.
PLACEMENT = ("dataset.root", "dataset.categories", "dataset.name", "dataset._target_", "backbone.name",
             "backbone.category", "device", "batch_size", "save_model")
DEFAULT_ROOTS = ("outputs", "multirun")
SKIPPED_FILE = "skipped.json"
_PRUNE = {"maps", "models", "wandb", ".hydra", ".submitit", "features"}


def is_ignored(key: str, groups: Iterable[str], nested: bool = True) -> bool:
    """Whether the dotted ``key`` is one of ``groups`` or lies below one (``viz.n`` below ``viz``); with
    ``nested``, also where the entry sits below another node (``cae.seed`` below ``seed``)."""
    parts = key.split(".")
    tails = [".".join(parts[start:]) for start in (range(len(parts)) if nested else (0,))]
    return any(tail == name or tail.startswith(f"{name}.") for tail in tails for name in groups)


def without(config: Mapping, groups: Iterable[str], prefix: str = "") -> dict:
    """A deep copy of ``config`` (plain containers) without the keys ``is_ignored`` by ``groups``."""
    groups = tuple(groups)
    kept = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if is_ignored(name, groups):
            continue
        kept[key] = without(value, groups, f"{name}.") if isinstance(value, Mapping) else copy.deepcopy(value)
    return kept


def hashable_config(config: Mapping) -> dict:
    """The resolved config without the ``BOOKKEEPING`` keys, nested ones included (nothing else removed)."""
    return without(config, BOOKKEEPING)


def config_hash(config) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``hashable_config(config)``.

    ``config`` is a record (``results["config"]``) or a DictConfig (recorded here: ``config_record``).
    """
    if not isinstance(config, dict):
        from experiments.harness.results import config_record

        config = config_record(config)
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


def find_partial(key: str, roots: Iterable[str | Path]) -> Path | None:
    """The newest *incomplete* ``results.json`` of config ``key`` with at least one finished category (a run
    that was killed or had a failing category), or None: a re-run takes its finished categories over."""
    found: list[tuple[float, Path]] = []
    for path in iter_results(roots):
        results = read_results(path)
        if (results and results.get("complete") is False and results_hash(results) == key
                and isinstance(results.get("categories"), dict) and results["categories"]):
            found.append((path.stat().st_mtime, path))
    return max(found)[1] if found else None


def resumable(cfg, run_dir: Path) -> Path | None:
    """The partial results.json a run of ``cfg`` resumes from (never with ``force=true``), or None."""
    if cfg.get("force", False):
        return None
    return find_partial(config_hash(cfg), search_roots(run_dir, _sweep_dir()))


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


# --------------------------------------------------------------------------- one run per config at a time

IN_PROGRESS_DIR = Path("outputs") / ".in_progress"  # relative to the working directory, like DEFAULT_ROOTS


def _alive(marker: dict) -> bool:
    """Whether the process that wrote ``marker`` still runs (on another host: assumed so)."""
    if marker.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(marker["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def claim_run(key: str, run_dir: Path, cwd: Path | None = None) -> Iterator[dict | None]:
    """Mark config ``key`` as in progress for the block; yields None when claimed, else the marker of the live
    process already running it (the caller skips: concurrent identical runs would double the work). A marker
    left by a dead process (kill -9) is taken over; created with O_EXCL, so two starts cannot both claim."""
    folder = (cwd or Path.cwd()) / IN_PROGRESS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "run_dir": str(run_dir), "config_hash": key}
    for _ in range(2):
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            other = read_results(path) or {}
            if other and _alive(other):
                yield other
                return
            path.unlink(missing_ok=True)  # stale: its process died
            continue
        with os.fdopen(handle, "w") as stream:
            json.dump(mine, stream)
        break
    else:  # pragma: no cover - another process took it between unlink and create
        yield read_results(path) or mine
        return
    try:
        yield None
    finally:
        path.unlink(missing_ok=True)


class RunDirTaken(ValueError):
    """The run folder holds the results of another config; the message says how to proceed."""


def check_run_dir(cfg, run_dir: Path) -> None:
    """Refuse a run folder whose results.json belongs to another config: it would be silently replaced
    (with its scores.csv and saved models)."""
    existing = read_results(run_dir / "results.json") if (run_dir / "results.json").is_file() else None
    if not existing:
        return
    theirs, ours = results_hash(existing), config_hash(cfg)
    if theirs != ours:
        state = "complete" if existing.get("complete") else "partial"
        raise RunDirTaken(f"{run_dir} already holds the {state} results of another config (hash {theirs}; this one "
                          f"is {ours}): set hydra.run.dir to a new folder, or move {run_dir / 'results.json'} "
                          "(and scores.csv, models/) aside first")
