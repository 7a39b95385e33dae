"""Export a saved model to one graph, images in, scores, maps and decisions out (core/export/):

    python experiments/export.py model_dir=outputs/.../models/bottle format=onnx out=exports/bottle

``format``: ``onnx`` (ONNX Runtime, TensorRT, ...), ``openvino`` (IR) or ``torchscript``. ONNX and OpenVINO
exports also hold the fast form (the feature graph and the bank: ``ExportedModel``'s default);
``precision=int8`` quantizes its feature graph, calibrated on the model's nominal training images
(``calibration.*``; null images: the training set the saved model's metadata names). The graph takes
uint8 (or float 0-1) crops ``[N, 3, H, W]`` as the model's preprocessing makes them and runs the exact
nearest-neighbour search over the bank in chunks (``chunk`` rows at a time). Run an ONNX or OpenVINO
export from Python with ``core.export.ExportedModel(out).predict_images([...])``; docs/deployment.md
(Export) lists what is and is not exported, the memory and the speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.harness.interrupts import exit_on_interrupt

log = logging.getLogger("export")


@exit_on_interrupt("nothing was exported (the folder is written whole or not at all); run the same command again")
@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from core.export import ExportError, UnsupportedExportError, export_model
    from core.export.writer import RECORD
    from core.io import remove_dead_temporaries
    from core.patchcore import PatchCore

    out = Path(cfg.out)
    for leftover in remove_dead_temporaries(out.parent, prefix=f".{out.name}.", recursive=False):
        log.info("removed %s, left unfinished by an export that was killed", leftover)
    try:
        model = PatchCore.load(cfg.model_dir, progress=False)
        calibration = calibration_set(cfg, model) if cfg.precision == "int8" else None
        out = export_model(model, cfg.out, cfg.format, chunk=int(cfg.chunk), input_dtype=cfg.input_dtype,
                           opset=int(cfg.opset), overwrite=bool(cfg.overwrite), precision=cfg.precision,
                           calibration=calibration)
    except (ValueError, FileNotFoundError, ExportError, UnsupportedExportError) as error:
        raise SystemExit(f"error: {error}") from None
    sizes = ", ".join(f"{path.name} ({path.stat().st_size / 2**20:.1f} MiB)" for path in sorted(out.iterdir()))
    print(f"exported {cfg.model_dir} as {cfg.format} to {out}: {sizes}; see {out / RECORD}")


def calibration_set(cfg: DictConfig, model):
    """The INT8 calibration images: ``calibration.images`` (files, folders, globs), or the nominal training
    images of the dataset and category the saved model's metadata records (its run's config)."""
    from hydra.utils import instantiate

    from core.export.quantize import Calibration
    from experiments.harness.prediction import expand_images

    node = cfg.calibration
    if node.images is not None:
        images = expand_images(list(node.images) if not isinstance(node.images, str) else node.images)
        where = f"calibration.images={node.images}"
    else:
        dataset, category = (model.metadata.get("config") or {}).get("dataset"), model.metadata.get("category")
        if not isinstance(dataset, dict) or not category:
            raise ValueError(f"{cfg.model_dir} records no dataset and category in its metadata: pass its nominal "
                             f"training images as calibration.images=<folder or glob>")
        images = [sample.path for sample in instantiate(dataset).train_samples(category)]
        where = f"the training set of {category} ({dataset.get('root')})"
    if not images:
        raise ValueError(f"{where} holds no images to calibrate precision=int8 on")
    log.info("INT8 calibration: %d nominal images from %s", len(images), where)
    return Calibration(images, count=int(node.count), heldout=int(node.heldout), seed=int(node.seed))


if __name__ == "__main__":
    main()
