"""Score new images with a saved model: decisions, heatmaps and defect masks at the images' own size.

    python experiments/predict.py model_dir=outputs/.../models/bottle images='/line/cam3/*.png' out=preds/

``images`` takes files, folders (every image inside, sorted), globs, or a list of them; any size,
grayscale or RGB. Unreadable files are reported (log and ``skipped.csv``) and skipped. Writes
``predictions.csv`` (path, score, decision, files) and per image ``<name>_heatmap.png`` (overlay)
and ``<name>_mask.png`` (binary, needs a model saved with a threshold). The model sees the same
resize + centre crop as at fit time; pixels outside the crop are not scored (set
``dataset.resize`` equal to ``dataset.image_size`` when fitting to score whole images).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from experiments.harness.interrupts import exit_on_interrupt
from experiments.harness.prediction import predict


@exit_on_interrupt("the prediction did not finish, and an earlier prediction in out is unchanged (the outputs "
                   "replace it only once complete); run the same command again (with overwrite=true if out "
                   "holds an earlier prediction)")
@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    images = list(cfg.images) if isinstance(cfg.images, ListConfig) else str(cfg.images)
    try:
        rows = predict(cfg.model_dir, images, HydraConfig.get().runtime.output_dir, cfg.device, cfg.batch_size,
                       cfg.progress, overwrite=cfg.overwrite)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    flagged = sum(row["decision"] == "anomalous" for row in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous; see {Path(cfg.out) / 'predictions.csv'}")


if __name__ == "__main__":
    main()
