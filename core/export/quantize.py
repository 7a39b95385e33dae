"""INT8 feature graphs: ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``, QDQ
format, per-channel int8 weights, uint8 activations, min-max calibration) of the fast form's feature graph,
calibrated on nominal images of the model's training set, and the drift that costs, measured against the
float32 feature graph on held-out nominal images (``int8_drift.json`` in the export folder).

Only the feature graph is quantized: the search and the scoring head stay float32 (the suite's own code), so
the neighbours are those of the INT8 features, found exactly. The single graph stays float32 (quantizing its
search would change which neighbours are found, not only their distances).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Images per calibration batch fed to ONNX Runtime's calibrator (its memory grows with the batch).
CALIBRATION_BATCH = 4


@dataclass
class Calibration:
    """Nominal images (paths, arrays, PIL images: anything ``core.api.prepare_images_uint8`` takes) of the model's
    training set: a seeded split of ``count`` calibration images and ``heldout`` others the drift is measured
    on (disjoint)."""

    images: Sequence
    count: int = 64
    heldout: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("count", "heldout"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"calibration.{key}={value!r} must be a positive integer")
        if len(self.images) < self.count + self.heldout:
            raise ValueError(f"calibration.count + calibration.heldout = {self.count + self.heldout} images, but "
                             f"only {len(self.images)} nominal training images were given: lower them, or pass "
                             f"more images (calibration.images)")

    def split(self) -> tuple[list, list]:
        """``(calibration images, held-out images)``: a seeded permutation, the first ``count`` and the next
        ``heldout``."""
        order = np.random.default_rng(self.seed).permutation(len(self.images))
        return ([self.images[i] for i in order[: self.count]],
                [self.images[i] for i in order[self.count : self.count + self.heldout]])


def quantize_features(float_onnx: Path, out: Path, crops: np.ndarray, input_name: str) -> dict:
    """``out``: the ONNX graph ``float_onnx`` quantized to INT8 (weights and data in ``out`` + ``out.data``),
    calibrated on ``crops`` (the graph's input); returns what the drift record says of the method."""
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([crops[start : start + CALIBRATION_BATCH]
                                 for start in range(0, len(crops), CALIBRATION_BATCH)])

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's recommended first step (shape inference, graph optimisation), next to the float32 graph
    prepared = float_onnx.with_name(f"prepared-{float_onnx.name}")
    quant_pre_process(str(float_onnx), str(prepared), save_as_external_data=True, all_tensors_to_one_file=True,
                      external_data_location=f"{prepared.name}.data")
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    return {"library": "onnxruntime", "version": onnxruntime.__version__,
            "method": "quantize_static: QDQ, per-channel int8 weights, uint8 activations, min-max calibration"}


def _relative(changed: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max and median of ``|changed - reference|`` over every value, relative to the largest ``|reference|``."""
    scale = float(reference.abs().max()) or 1.0
    change = ((changed.double() - reference.double()).abs().flatten() / scale).numpy()
    return {"max_rel_change": float(change.max()), "median_rel_change": float(np.median(change))}


def drift_record(float32, int8, crops: np.ndarray, method: dict, calibration: Calibration) -> dict:
    """``int8_drift.json``: patch scores, image scores and maps of the INT8 fast form (``int8``, a
    ``core.export.fast.FastForm``) against the float32 one (``float32``) on the held-out ``crops``."""
    scores = {}
    for name, form in (("float32", float32), ("int8", int8)):
        patch = torch.cat([form.patch_scores(crops[i : i + 1]) for i in range(len(crops))])
        image, maps = (np.concatenate(part) for part in zip(*(form.run(crops[i : i + 1])[:2]
                                                                for i in range(len(crops)))))
        scores[name] = (patch, torch.from_numpy(image), torch.from_numpy(maps))
    (patch32, image32, maps32), (patch8, image8, maps8) = scores["float32"], scores["int8"]
    record = {"precision": "int8", **method, "measured_with": "onnxruntime", "relative_to": "float32 feature graph, "
              "change / largest float32 value over the held-out images",
              "calibration_images": calibration.count, "heldout_images": calibration.heldout,
              "seed": calibration.seed, "patch_scores": _relative(patch8, patch32),
              "image_scores": _relative(image8, image32), "maps": _relative(maps8, maps32)}
    values = [v for part in ("patch_scores", "image_scores", "maps") for v in record[part].values()]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the INT8 feature graph gives non-finite scores on the held-out images ({record}): "
                         f"export with precision=float32")
    return record
