"""The study's main table in W&B: one ``report`` run in the study's group (offline unless WANDB_MODE=online),
one table row per (comparison, arm, seed, category) with its metrics, its results.json and, for runs made
with ``save_model=true``, the name of the model artifact its own W&B run logged (experiments/harness/tracking.py
``model_artifact_name``), so each row leads to the model that made it. Like all tracking, a missing wandb
package or a W&B error is a warning, never a failed report."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from experiments.harness.results import METRICS
from experiments.harness.tracking import model_artifact_name

log = logging.getLogger("patchcore")
COLUMNS = ["comparison", "arm", "seed", "category", *METRICS, "fit_s", "config_hash", "results_json", "model_artifact"]


def log_main_table(ctx, out: Path) -> str | None:
    """Log the table; returns the W&B run folder, or None when nothing was logged."""
    manifest = ctx.manifest or {}
    try:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "patchcore"), entity=os.environ.get("WANDB_ENTITY"),
                         mode=os.environ.get("WANDB_MODE", "offline"), group=str(manifest.get("study")),
                         job_type="report", name=f"report {manifest.get('study')}", dir=str(out),
                         tags=[f"study:{manifest.get('study')}", "report"], reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True))
        rows = [[comparison.name, arm.name, row.seed, row.category,
                 *(None if getattr(row, m) != getattr(row, m) else float(getattr(row, m)) for m in METRICS), row.fit_s,
                 row.config_hash, str(Path(row.run_dir) / "results.json"),
                 model_artifact_name(row.config_hash, row.category)
                 if (Path(row.run_dir) / "models" / row.category / "model.json").is_file() else None]
                for comparison in ctx.present for arm in comparison.arms for row in arm.rows.itertuples()]
        run.log({"main_table": wandb.Table(columns=COLUMNS, data=rows)})
        folder = run.dir
        run.finish()
        return folder
    except Exception as error:  # tracking never breaks the report
        warnings.warn(f"W&B: the main table was not logged ({type(error).__name__}: {error})", RuntimeWarning,
                      stacklevel=2)
        return None
