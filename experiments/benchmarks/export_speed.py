"""Exported models' prediction speed and quality next to PyTorch's (``make bench``; ``--skip export``).

On the same preloaded uint8 crops: PyTorch ``PatchCore.score`` as ``predict`` runs it, then ONNX Runtime and
OpenVINO as ``predict_images`` runs them (``ExportedModel.run_batches``), each in both forms of an export (the
single graph; the fast form: feature graph + the suite's search and scoring head) with a float32 feature graph
and an INT8 one (``precision=int8``, calibrated on nominal training images), and OpenVINO's bf16 single graph.
Every line carries its largest score and map difference to PyTorch and its image / pixel AUROC and their change
against PyTorch's. Then the fast form under ONNX Runtime with 1 and 2 threads and batches of 1, 4 and 8
(docs/performance.md, Exported runtimes: threads and batch).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.api import crop_uint8, normalize
from core.data import read_image
from core.detector import collect_predictions
from core.export import ExportedModel, export_model, onnx_to_openvino
from core.export.quantize import Calibration
from core.metrics import image_auroc, pixel_auroc
from core.patchcore import PatchCore
from experiments.benchmarks.recording import Recorder, measured, median_run, seconds_runs

PYTORCH = "PyTorch PatchCore.score as predict runs it (preloaded crops)"
FAST_F32_ORT = "exported fast form, ONNX Runtime, float32 feature graph (preloaded crops)"
REPEATS = 3  # interleaved runs of PyTorch and the fast form each (the goal's two lines); medians reported
# (folder, runtime precision hint, form, label)
RUNS = (("onnx", "f32", "graph", "exported single graph, ONNX Runtime, float32"),
        ("onnx", "f32", "fast", "exported fast form, ONNX Runtime, float32 feature graph"),
        ("onnx-int8", "f32", "fast", "exported fast form, ONNX Runtime, INT8 feature graph"),
        ("openvino", "f32", "graph", "exported single graph, OpenVINO f32"),
        ("openvino", "f32", "fast", "exported fast form, OpenVINO, float32 feature graph"),
        ("openvino-int8", "f32", "fast", "exported fast form, OpenVINO, INT8 feature graph"),
        ("openvino", "bf16", "graph", "exported single graph, OpenVINO bf16 (its default on CPUs with bf16)"))
THREADS, BATCHES = (1, 2), (1, 4, 8)


def calibration_for(paths: list, seed: int = 0) -> Calibration:
    """The bench's INT8 calibration: up to 64 training images, up to 16 others held out for the drift."""
    heldout = max(1, min(16, len(paths) // 4))
    return Calibration(list(paths), count=min(64, len(paths) - heldout), heldout=heldout, seed=seed)


def _test_arrays(test: DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test set's uint8 crops (as ``prepare_images_uint8`` makes them, preloaded: decoding not timed), its
    labels and its masks."""
    dataset = test.dataset
    crops = torch.stack([crop_uint8(read_image(sample.path), dataset.preprocessing) for sample in dataset.samples])
    labels, masks = [], []
    for batch in test:
        labels.append(np.asarray(batch["label"]))
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return crops.numpy(), np.concatenate(labels), np.concatenate(masks)


def _quality(labels, masks, scores, maps, reference: dict | None) -> dict:
    quality = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps)}
    quality = {key: None if value is None else round(value, 4) for key, value in quality.items()}
    if reference is not None:
        for key in ("image_auroc", "pixel_auroc"):
            if quality[key] is not None and reference[key] is not None:
                quality[f"{key}_diff"] = round(quality[key] - reference[key], 4)
        quality["max_rel_score_diff"] = float(np.abs(scores - reference["scores"]).max()
                                              / np.abs(reference["scores"]).max())
        quality["max_rel_map_diff"] = float(np.abs(maps - reference["maps"]).max() / np.abs(reference["maps"]).max())
    return quality


def _exports(model: PatchCore, root: Path, calibration: Calibration) -> dict[str, float]:
    """The four export folders under ``root``; returns each export's seconds."""
    seconds = {}
    for name, precision in (("onnx", "float32"), ("onnx-int8", "int8")):
        start = time.perf_counter()
        export_model(model, root / name, "onnx", precision=precision,
                     calibration=calibration if precision == "int8" else None)
        seconds[name] = round(time.perf_counter() - start, 1)
        onnx_to_openvino(root / name, root / name.replace("onnx", "openvino"))
    return seconds


def bench_exported(rec: Recorder, model: PatchCore, test: DataLoader, train_paths: list, batch_size: int = 8,
                   **tag) -> None:
    """``predict`` lines of PyTorch and of every exported runtime x form x precision (``RUNS``) on the same
    preloaded crops, then the fast form's threads x batch lines; the INT8 exports' drift records in the lines.
    PyTorch and the ONNX Runtime float32 fast form (the goal's two lines, equal within a few percent) are timed
    interleaved, ``REPEATS`` times each, and their medians reported: one run each left the ratio to the VM's
    noise (0.97x and 1.02x in two runs of the same code)."""
    import json

    crops, labels, masks = _test_arrays(test)
    batches = [crops[start : start + batch_size] for start in range(0, len(crops), batch_size)]
    normalised = [{"image": normalize(torch.from_numpy(batch), model.preprocessing)} for batch in batches]
    workers = torch.get_num_threads()

    def pytorch(images: list) -> tuple[np.ndarray, np.ndarray]:  # as PatchCore.predict runs it
        found = collect_predictions(model.score, images, progress=False, workers=workers)
        return found.image_scores, found.maps

    def exported_run(exported: ExportedModel, arrays: list) -> tuple[np.ndarray, np.ndarray]:
        outputs = list(exported.run_batches(arrays))  # as predict_images runs it
        return (np.concatenate([o["image_scores"] for o in outputs]),
                np.concatenate([o["anomaly_maps"] for o in outputs]))

    base = {"bank_size": len(model.bank), "batch": batch_size, **tag}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        root = Path(tmp)
        export_s = _exports(model, root, calibration_for(train_paths))
        drift = json.loads((root / "onnx-int8" / "int8_drift.json").read_text())
        fast = ExportedModel(root / "onnx", form="fast")
        pytorch(normalised[:1])  # warm-ups
        exported_run(fast, batches[:1])
        paired: dict[str, list[dict]] = {PYTORCH: [], FAST_F32_ORT: []}  # measurements, each with its outputs
        calls = ((PYTORCH, lambda: pytorch(normalised)), (FAST_F32_ORT, lambda: exported_run(fast, batches)))
        for _ in range(REPEATS):
            for name, call in calls:
                with measured() as m:
                    outputs = call()
                paired[name].append({**m, "outputs": outputs})
        m = median_run(paired[PYTORCH])
        scores, maps = m["outputs"]
        reference = {"scores": scores, "maps": maps, **_quality(labels, masks, scores, maps, None)}
        rec.emit("predict", len(crops), model.bank.dim, None, m["seconds"], len(crops), m["peak_rss_mb"],
                 variant=PYTORCH, **base, seconds_runs=seconds_runs(paired[PYTORCH]),
                 **_quality(labels, masks, scores, maps, None))
        for folder, hint, form, label in RUNS:
            variant, extra = f"{label} (preloaded crops)", {"export_s": export_s[folder.replace("openvino", "onnx")]}
            if variant == FAST_F32_ORT:
                m = median_run(paired[variant])
                scores, maps = m["outputs"]
                extra["seconds_runs"] = seconds_runs(paired[variant])
            else:
                exported = ExportedModel(root / folder, precision=hint, form=form)
                exported_run(exported, batches[:1])  # warm-up
                with measured() as m:
                    scores, maps = exported_run(exported, batches)
            if folder.endswith("int8"):
                extra.update(int8_drift_maps_max=drift["maps"]["max_rel_change"],
                             int8_drift_patch_max=drift["patch_scores"]["max_rel_change"])
            rec.emit("predict", len(crops), model.bank.dim, None, m["seconds"], len(crops), m["peak_rss_mb"],
                     variant=variant, form=form, **base, **_quality(labels, masks, scores, maps, reference), **extra)
        threads_and_batches(rec, root / "onnx", crops, base)


def threads_and_batches(rec: Recorder, folder: Path, crops: np.ndarray, base: dict) -> None:
    """The fast form under ONNX Runtime with ``THREADS`` x ``BATCHES`` (threads: Python threads over pieces of
    the batches, one intra-op thread each, as ``predict_images`` runs it: ``core.threads.pipelined``)."""
    for threads in THREADS:
        exported = ExportedModel(folder, form="fast", threads=threads)
        for batch in BATCHES:
            pieces = [crops[start : start + batch] for start in range(0, len(crops), batch)]
            exported.run(pieces[0])  # warm-up
            with measured() as m:
                for _ in exported.run_batches(pieces):
                    pass
            rec.emit("predict", len(crops), None, None, m["seconds"], len(crops), m["peak_rss_mb"],
                     variant=f"exported fast form, ONNX Runtime float32, {threads} thread(s), batches of {batch}",
                     **{**base, "batch": batch, "runtime_threads": threads})
