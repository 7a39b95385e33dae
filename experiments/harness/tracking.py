"""Experiment tracking: the ``logger`` config group (``conf/logger/{wandb,none}.yaml``).

W&B is a mirror of the run record: ``results.json`` stays the source of truth, and tracking can never
break a run. Every logger has the same three calls, made by ``experiments/main.py``::

    start(config, run_dir, group, name)       once, before the first category
    log_category(category, entry, rows, maps) after each finished category (its results.json entry,
                                              its scores.csv rows, the PNGs of its saved anomaly maps)
    finish(results)                           once at the end (None if the run crashed)

``NoLogger`` (``logger=none``) does nothing and imports nothing. ``WandbLogger`` (``logger=wandb``,
the default) imports wandb lazily and runs in ``offline`` mode unless ``WANDB_MODE=online`` or
``logger.mode=online``: no account is needed, ``wandb sync <run_dir>/wandb/offline-run-*`` uploads
later. A missing wandb package or any W&B error becomes one warning and logging stops for that run.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Protocol

from experiments.harness.results import METRICS, TIMINGS

log = logging.getLogger("patchcore")

_SIZES = ("bank_size", "n_train", "n_test")
_MODES = ("online", "offline", "disabled")


class Tracker(Protocol):
    """What ``experiments/main.py`` calls on a logger (the three calls above)."""

    def start(self, config: dict, run_dir: Path, group: str | None = None, name: str | None = None) -> None: ...

    def log_category(self, category: str, entry: dict, rows: list[dict], maps: list[Path] = ()) -> None: ...

    def finish(self, results: dict | None) -> None: ...


class NoLogger:
    """``logger=none``: logs nothing, writes nothing."""

    def start(self, config: dict, run_dir: Path, group: str | None = None, name: str | None = None) -> None:
        pass

    def log_category(self, category: str, entry: dict, rows: list[dict], maps: list[Path] = ()) -> None:
        pass

    def finish(self, results: dict | None) -> None:
        pass


def _guarded(method):
    """Run a W&B call; on any error warn once, stop logging for this run, and carry on."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.disabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # tracking must never break the run
            self.disabled = True
            message = (f"W&B logging stopped ({method.__name__}: {type(error).__name__}: {error}); "
                       "results.json and scores.csv are unaffected")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            try:
                if self.run is not None:
                    self.run.finish(exit_code=1)
            except Exception:
                pass
            self.run = None
            return None

    return wrapper


class WandbLogger(NoLogger):
    """``logger=wandb``: config, per-category metrics, the mean, timings, score table, a few anomaly maps."""

    def __init__(self, project: str = "patchcore", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, tags: list[str] | tuple[str, ...] = (), dir: str | None = None,
                 log_images: bool = True, log_scores: bool = True, job_type: str | None = None) -> None:
        self.project = project
        self.entity = entity
        self.mode = str(mode).lower()
        self.group = group
        self.job_type = job_type  # null: the backbone's name (a study sets its comparison)
        self.tags = [str(tag) for tag in tags or ()]
        self.dir = dir
        self.log_images = log_images
        self.log_scores = log_scores
        self.run = None
        self.disabled = False
        self._rows: list[dict] = []
        self._wandb = None

    @_guarded
    def start(self, config: dict, run_dir: Path, group: str | None = None, name: str | None = None) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"logger.mode={self.mode!r}: choose one of {', '.join(_MODES)}")
        try:
            import wandb
        except ImportError:
            raise ImportError("wandb is not installed (pip install wandb), or use logger=none") from None
        from experiments.harness.run_key import config_hash

        self._wandb = wandb
        self._run_dir, self._hash = Path(run_dir), config_hash(config)
        folder = Path(self.dir) if self.dir else Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        backbone = (config.get("backbone") or {}).get("name")
        dataset = (config.get("dataset") or {}).get("name")
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, dir=str(folder),
            group=self.group or group, name=name, job_type=self.job_type or backbone,
            tags=[t for t in (dataset, backbone, *self.tags) if t],
            config={**config, "config_hash": config_hash(config), "run_dir": str(run_dir)},
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        log.info("W&B run %s (%s mode) in %s", self.run.id, self.mode, folder / "wandb")

    @_guarded
    def log_category(self, category: str, entry: dict, rows: list[dict], maps: list[Path] = ()) -> None:
        if self.run is None:
            return
        data = {f"{category}/{key}": entry[key] for key in (*METRICS, *_SIZES)
                if entry.get(key) is not None}
        data.update({f"{category}/time_{stage}_s": value for stage, value in (entry.get("timings_s") or {}).items()})
        if self.log_images and maps:
            data[f"{category}/anomaly_maps"] = [
                self._wandb.Image(str(path), caption=f"{category}: {Path(path).stem} (image | ground truth | map)")
                for path in maps
            ]
        self.run.log(data)
        self._rows.extend(rows)

    @_guarded
    def finish(self, results: dict | None) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        if results is not None:
            for metric, value in (results.get("mean") or {}).items():
                if value is not None:
                    run.summary[f"mean/{metric}"] = value
            run.summary.update({key: results.get(key) for key in ("complete", "total_time_s", "peak_rss_mb",
                                                                   "config_hash")})
            columns = ["category", *METRICS, *_SIZES, *(f"{stage}_s" for stage in TIMINGS)]
            table = self._wandb.Table(columns=columns)
            for category, entry in results.get("categories", {}).items():
                timings = entry.get("timings_s") or {}
                table.add_data(category, *(entry.get(key) for key in (*METRICS, *_SIZES)),
                               *(timings.get(stage) for stage in TIMINGS))
            tables = {"metrics": table}
            if self.log_scores and self._rows:
                score_columns = list(self._rows[0])
                tables["scores"] = self._wandb.Table(columns=score_columns,
                                                     data=[[row[c] for c in score_columns] for row in self._rows])
            run.log(tables)
            for category in results.get("categories", {}):  # save_model=true: each saved model as an artifact
                folder = self._run_dir / "models" / category
                if (folder / "model.json").is_file():
                    artifact = self._wandb.Artifact(model_artifact_name(self._hash, category), type="model",
                                                    metadata={"category": category, "config_hash": self._hash})
                    artifact.add_dir(str(folder))
                    run.log_artifact(artifact)
        complete = results is not None and results.get("complete") is True
        run.finish(exit_code=0 if complete else 1)


def model_artifact_name(config_hash: str, category: str) -> str:
    """The W&B artifact of a saved model: one name per (config, category), so a report row can name it."""
    return f"model-{config_hash}-{category}".replace("/", "_")


def hydra_labels(run_dir: Path) -> tuple[str | None, str]:
    """(group, name) for a tracker: the sweep folder groups a multirun's jobs; the overrides name the job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None, Path(run_dir).name
    group = str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    name = hydra_cfg.job.override_dirname or Path(run_dir).name
    return group, name


def make_tracker(cfg, run_dir: Path) -> Tracker:
    """Build ``cfg.logger`` and start it; a logger that cannot be built is a warning and ``NoLogger``."""
    node = cfg.get("logger") if hasattr(cfg, "get") else None
    if not node:
        return NoLogger()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    try:
        tracker = instantiate(node)
    except Exception as error:
        warnings.warn(f"logger could not be built ({error}); logging nothing", RuntimeWarning, stacklevel=2)
        return NoLogger()
    group, name = hydra_labels(run_dir)
    tracker.start(OmegaConf.to_container(cfg, resolve=True), Path(run_dir), group=group, name=name)
    return tracker
