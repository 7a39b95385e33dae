"""``ExportedModel``: an exported folder (``core.export.writer``) run by ONNX Runtime or OpenVINO, no torch
model needed: ``ExportedModel(folder).predict_images(["a.png", array, pil_image])`` returns the same
``core.api.ImagePredictions`` as ``PatchCore.predict_images``, through the same preprocessing code
(``core.api.prepare_images_uint8``) and the same way back to each input's resolution.

Two forms of the same model sit in an export folder (``form``): ``fast`` (the default where the folder has it:
the feature graph, then the suite's exact search and scoring head in Python, ``core.export.fast``) and
``graph`` (the single self-contained graph, images to scores, for C++ and other runtimes; the only form of
exports written before the fast one). Both are guarded by the same manifest.

The folder's manifest is checked first (a modified or half-copied file is refused by name). OpenVINO is
compiled with ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bfloat16 units its default would compute in
bfloat16, which moves the scores by ~0.1% (measured: docs/deployment.md); ``precision="bf16"`` asks for
that explicitly. Threads: the PyTorch path's rule (``core.threads``; ``core.export.sessions``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from core.api import ImageInput, ImagePredictions, model_preprocessing, prepare_images_uint8
from core.data import Preprocessing
from core.export.fast import FastForm
from core.export.record import RECORD, ExportedModelError, read_export_record
from core.export.sessions import open_runner
from core.threads import in_pieces, pipelined, thread_budget

RUNTIMES = ("onnx", "openvino")
PRECISIONS = ("f32", "bf16", "f16")
FORMS = ("fast", "graph")


class ExportedModel:
    """An exported PatchCore: ``run(batch)`` on preprocessed uint8 (or 0-1 float) crops, ``predict_images`` on
    images as a user has them.

    ``form``: ``fast`` | ``graph`` (None: fast where the folder has it, else graph); ``threads``: Python threads
    a batch is split over, each running the graph on one intra-op thread (None: ``core.threads.thread_budget``
    at each run)."""

    def __init__(self, folder: str | Path, precision: str = "f32", threads: int | None = None,
                 form: str | None = None) -> None:
        self.folder = Path(folder)
        self.record = read_export_record(self.folder)  # the files, then every key of export.json
        self.format = self.record["format"]
        self.file = self.folder / self.record["file"]
        if self.format not in RUNTIMES:
            raise ExportedModelError(f"{self.file} is a {self.format} export, which ExportedModel does not run (it "
                                     f"runs {RUNTIMES}): load it with torch.jit.load, or export format=onnx")
        if precision not in PRECISIONS or (self.format == "onnx" and precision != "f32"):
            raise ExportedModelError(f"precision={precision!r}: ONNX Runtime runs f32; OpenVINO one of {PRECISIONS}")
        spec = self.record["input"]
        self.input_name, self.input_dtype = spec["name"], spec["dtype"]
        self.input_size = tuple(spec["shape"][2:])
        self.outputs = list(self.record["outputs"])
        self.preprocessing = (None if self.record.get("preprocessing") is None
                              else Preprocessing(**self.record["preprocessing"]))
        self.threshold = self.record.get("threshold")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ExportedModelError(f"threads={threads!r}: a positive number of threads, or None for the budget")
        self.threads = threads  # None: the budget when run is called, as the PyTorch path reads it
        self.form = self._form(form)
        streams = thread_budget() if threads is None else threads  # OpenVINO's, fixed when compiled
        if self.form == "graph":
            runner = open_runner(self.file, self.format, precision, streams)
        else:
            self.fast = FastForm(self.folder, self.record, open_runner(self.folder / self.record["fast"]["file"],
                                                                       self.format, precision, streams))
            runner = self.fast.run
        self._runner = runner

    def _form(self, form: str | None) -> str:
        if form is None:
            return "fast" if self.record.get("fast") else "graph"
        if form not in FORMS:
            raise ExportedModelError(f"form={form!r}: choose one of {FORMS} (or None: fast where the export has it)")
        if form == "fast" and not self.record.get("fast"):
            raise ExportedModelError(f"{self.folder} holds no fast form (exported before it existed): export the "
                                     f"model again with this code, or run form='graph'")
        return form

    def run(self, batch) -> dict[str, np.ndarray]:
        """The graph's outputs (``image_scores``, ``anomaly_maps``, and ``image_decisions``/``anomaly_masks``
        when it has thresholds) for ``batch [N, 3, H, W]`` at the export's input size and dtype."""
        batch = self._checked(batch)
        return self._outputs(in_pieces(self._runner, batch, self.threads))

    def run_batches(self, batches: Iterable) -> Iterator[dict[str, np.ndarray]]:
        """``run`` of each batch, in order, with the pieces of every batch on the threads at once
        (``core.threads.pipelined``, as ``PatchCore.predict`` scores a loader): no thread waits at the end of a
        batch, and the next batch is read while the threads work."""
        checked = ((None, self._checked(batch)) for batch in batches)
        for _, parts in pipelined(self._runner, checked, self.threads):
            yield self._outputs(parts)

    def _checked(self, batch) -> np.ndarray:
        """``batch`` as a contiguous array, or an error that says what the graph takes."""
        batch = np.asarray(batch)
        expected = (3, *self.input_size)
        if batch.ndim != 4 or batch.shape[1] != 3:
            channels = batch.shape[1] if batch.ndim == 4 else None
            raise ExportedModelError(
                f"the exported model {self.file} takes RGB images as [N, 3, {expected[1]}, {expected[2]}]; got shape "
                f"{tuple(batch.shape)}" + (f" ({channels} channels)" if channels is not None else "")
                + ": convert the images to 3-channel RGB (predict_images does it for paths, numpy arrays and PIL "
                  "images) and stack them channels first")
        if tuple(batch.shape[2:]) != tuple(self.input_size):
            raise ExportedModelError(
                f"the exported model {self.file} takes {expected[1]}x{expected[2]} crops; got "
                f"{batch.shape[2]}x{batch.shape[3]}: resize and crop as recorded in {self.folder / RECORD} "
                f"(predict_images does it)")
        dtype = np.uint8 if self.input_dtype == "uint8" else np.float32
        if batch.dtype != dtype:
            raise ExportedModelError(f"the exported model {self.file} takes {self.input_dtype} images "
                                     f"({self.record['input']['range']}); got {batch.dtype}")
        return np.ascontiguousarray(batch)

    def _outputs(self, pieces: list) -> dict[str, np.ndarray]:
        """The pieces' outputs joined and named; a NaN or infinite score or pixel is anomalous, never nominal: as
        the graph itself decides (core.scoring.ScoringHead.anomalous), enforced here too for graphs exported
        before it did."""
        outputs = dict(zip(self.outputs, _joined(pieces)))
        if "image_decisions" in outputs:
            outputs["image_decisions"] = outputs["image_decisions"] | ~np.isfinite(outputs["image_scores"])
        if "anomaly_masks" in outputs:
            outputs["anomaly_masks"] = outputs["anomaly_masks"] | ~np.isfinite(outputs["anomaly_maps"])
        return outputs

    def predict_images(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 8) -> ImagePredictions:
        """As ``PatchCore.predict_images``: paths, numpy arrays, PIL images of any size -> scores, maps at each
        input's resolution, masks and decisions when the model was exported with thresholds."""
        preprocessing = model_preprocessing(self)
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        if not images:
            raise ValueError("predict_images got no images: pass a list of paths, numpy arrays or PIL images")
        sizes: list = []

        def prepared() -> Iterator[np.ndarray]:  # read while the threads score the batches before
            for start in range(0, len(images), batch_size):
                batch, batch_sizes = prepare_images_uint8(images[start : start + batch_size], self)
                sizes.extend(batch_sizes)
                batch = batch.numpy()
                yield batch if self.input_dtype == "uint8" else batch.astype(np.float32) * np.float32(1.0 / 255)

        outputs = list(self.run_batches(prepared()))
        scores = np.concatenate([output["image_scores"] for output in outputs])
        maps = np.concatenate([output["anomaly_maps"] for output in outputs])
        bad = [i for i, finite in enumerate(np.isfinite(scores).tolist()) if not finite]
        if bad:
            raise ValueError(f"the image scores of inputs {bad} are NaN or infinite: the exported model or the "
                             f"inputs are broken (check them, or export again)")
        return ImagePredictions.from_crops(scores, maps, sizes, preprocessing, self.threshold)


def _joined(pieces: list) -> list[np.ndarray]:
    """Each output's pieces, concatenated in order."""
    return [np.concatenate(parts) for parts in zip(*pieces)]
