"""Tracking of fine-tuning runs: the ``logger`` group of main.py (W&B, offline by default), plus the JSONL logs.

``make_tracker`` (experiments/harness/tracking.py) builds and starts the configured logger with the whole
config, exactly as for ``main.py``; this adapter then logs, per category, every training step
(``<category>/train/<key>``: loss, task loss, L2-SP, learning rates, accuracy), every proxy
evaluation (``<category>/proxy/<key>``: proxy AUROCs, per-kind AUROCs, collapse monitors), and the
selected step with its proxy scores and monitors in the run summary. The JSONL logs next to the
checkpoint stay the source of truth; a W&B error warns once and logging stops (tracking never breaks a run).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from experiments.harness.tracking import NoLogger, Tracker, make_tracker

log = logging.getLogger("finetune")


class FinetuneTracking:
    """Per-step and per-evaluation rows to the started ``tracker`` (``NoLogger``: nothing)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._categories: set[str] = set()

    @classmethod
    def start(cls, cfg, run_dir: Path | None) -> FinetuneTracking:
        if run_dir is None:  # called as a library (tests): no run folder to put the W&B files in
            return cls(NoLogger())
        tracking = cls(make_tracker(cfg, Path(run_dir)))
        method = (cfg.get("method") or {}).get("name")
        tracking._call(lambda run: setattr(run, "tags", (*run.tags, "finetune", *([method] if method else []))))
        return tracking

    def _call(self, action) -> None:
        run = getattr(self.tracker, "run", None)
        if run is None or getattr(self.tracker, "disabled", False):
            return
        try:
            action(run)
        except Exception as error:  # tracking must never break the run
            self.tracker.disabled = True
            message = f"W&B logging stopped ({type(error).__name__}: {error}); the JSONL logs are unaffected"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning(message)

    def _log(self, category: str, kind: str, row: dict) -> None:
        def action(run) -> None:
            if category not in self._categories:  # each category's curves against its own step
                run.define_metric(f"{category}/step")
                run.define_metric(f"{category}/*", step_metric=f"{category}/step")
                self._categories.add(category)
            data = {f"{category}/{kind}/{key}": value for key, value in row.items()
                    if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)}
            run.log({f"{category}/step": row["step"], **data})

        self._call(action)

    def log_step(self, category: str, row: dict) -> None:
        self._log(category, "train", row)

    def log_eval(self, category: str, row: dict) -> None:
        self._log(category, "proxy", row)

    def log_selected(self, category: str, record: dict) -> None:
        """The selected step, its proxy scores and monitors, and how the run ended, in the run summary."""
        selection = record.get("selection") or {}
        values = {"selected_step": record.get("selected_step"), "steps": record.get("steps"),
                  "stop_reason": record.get("stop_reason"), "train_time_s": record.get("train_time_s"),
                  **{f"proxy_{k}": v for k, v in (selection.get("proxy") or {}).items()},
                  **(selection.get("monitors") or {})}
        self._call(lambda run: run.summary.update({f"{category}/{k}": v for k, v in values.items()
                                                   if v is not None}))

    def finish(self, complete: bool) -> None:
        def action(run) -> None:
            self.tracker.run = None
            run.finish(exit_code=0 if complete else 1)

        self._call(action)
