"""A Hydra callback that checks the output folder before Hydra itself writes into it.

Hydra makes the run folder and opens its log file there before the task function runs, so an
unwritable ``hydra.run.dir`` (a read-only disk, a path through a file) would end in a traceback from
Hydra's logging set-up. ``on_run_start`` / ``on_multirun_start`` run first: they stop with one line
that names the setting and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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
