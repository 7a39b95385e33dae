"""Hydra callbacks that check the output folder before Hydra itself writes into it.

Hydra makes the run folder, opens its log file there and writes ``.hydra/`` (config.yaml, hydra.yaml,
overrides.yaml) before the task function runs, so an unwritable ``hydra.run.dir`` (a read-only disk, a
path through a file) would end in a traceback from Hydra's logging set-up, and a run refused by the task
because its folder holds another config's results would already have overwritten that run's ``.hydra/``.
``on_run_start`` / ``on_multirun_start`` run first: they stop with one line that names the setting and the
fix, and leave the folder as it was.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from experiments.harness.run_key import RunDirTaken, check_run_dir
from experiments.harness.run_settings import check_writable


class CheckOutputFolder(Callback):
    """Refuse an output folder that cannot be written, before Hydra creates it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config, "hydra.sweep.dir")


def _check(config: DictConfig, key: str) -> None:
    folder = OmegaConf.select(config, key)
    if folder is None:
        return
    try:
        check_writable(Path(str(folder)), f"the output folder ({key})")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


class RefuseTakenRunFolder(Callback):
    """``main.py`` only: refuse a ``hydra.run.dir`` that holds another config's results.json before Hydra writes
    its log and ``.hydra/`` there (the same ``check_run_dir`` the harness runs again for each job; a multirun's
    job folders are only known per job, so there the harness's check is the one that refuses)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = OmegaConf.select(config, "hydra.run.dir")
        if folder is None or not (Path(str(folder)) / "results.json").is_file():
            return  # nothing to protect: the hash is not even computed
        HydraConfig.instance().set_config(config)  # ${hydra:...} in the task's settings (run_job does the same next)
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]  # the task's config, as the task function gets it
        try:
            check_run_dir(task, Path(str(folder)))
        except RunDirTaken as error:
            raise SystemExit(f"error: {error}") from None
