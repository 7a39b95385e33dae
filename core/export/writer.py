"""Writing an exported model: one folder, whole or not at all.

``export_model(model, out, format)`` builds ``ExportablePatchCore`` from a fitted (or loaded) PatchCore and
writes, into a temporary sibling of ``out`` that is renamed into place only when complete:

- the graph: ``model.onnx`` (+ ``model.onnx.data``, the weights and bank as ONNX external data),
  ``model.xml`` + ``model.bin`` (OpenVINO IR, converted from the ONNX graph, float32 weights kept), or
  ``model.pt`` (TorchScript, traced);
- ``export.json``: the input (name, dtype, shape), the outputs, the preprocessing and thresholds of the
  source model (what ``core.export.runtime.ExportedModel`` needs to take raw images), the chunk size, which
  exporter produced the graph, the versions;
- the fast form (ONNX and OpenVINO): ``features.onnx`` (+ ``.data``) or ``features.xml`` + ``.bin``, the graph
  up to the patch features (``ExportableFeatures``; INT8 with ``precision="int8"``, ``core.export.quantize``,
  whose drift record ``int8_drift.json`` comes with it), and ``bank.safetensors`` (the bank as a saved model
  holds it), searched and scored by the suite's own code (``core.export.fast``);
- ``manifest.json``: the SHA-256 of each file (``core.model_files``), checked by ``ExportedModel``.

ONNX goes through ``torch.onnx.export(dynamo=True)``; should that exporter fail on some backbone, the
TorchScript-based one (``dynamo=False``) is tried and the record says which one wrote the file.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from core.export.graph import DEFAULT_CHUNK, ExportableFeatures, ExportablePatchCore
from core.export.quantize import Calibration
from core.export.record import (
    DRIFT_FILE,
    EXPORT_FORMAT_VERSION,
    EXPORT_PRECISIONS,
    FEATURE_FILES,
    FEATURES_OUTPUT,
    FORMATS,
    GRAPH_FILES,
    INPUT_NAME,
    RANGES,
    RECORD,
    read_export_record,
)
from core.io import write_json_atomic
from core.model_files import write_sealed_folder, write_tensors
from core.saved_model import BANK_FILE

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """An export that could not be written; the message says why and what to change."""


def export_model(model, out: str | Path, format: str = "onnx", chunk: int = DEFAULT_CHUNK,
                 input_dtype: str = "uint8", opset: int = DEFAULT_OPSET, overwrite: bool = False,
                 precision: str = "float32", calibration: Calibration | None = None) -> Path:
    """Export ``model`` (a fitted ``PatchCore``) to the folder ``out``; returns ``out``. An existing export
    there is replaced only with ``overwrite``; any other existing, non-empty folder is refused. ONNX and
    OpenVINO exports hold both forms (the single graph, and the fast form's feature graph and bank);
    ``precision="int8"`` quantizes the feature graph, calibrated and checked on ``calibration``'s images."""
    if format not in FORMATS:
        raise ValueError(f"export format={format!r}: choose one of {FORMATS}")
    _check_precision(format, precision, calibration)
    out = Path(out)
    _check_target(out, overwrite)
    threshold = getattr(model, "threshold", None) or {}
    pair = None if threshold.get("image_threshold") is None else (threshold["image_threshold"],
                                                                     threshold.get("pixel_threshold"))
    graph = ExportablePatchCore(model, chunk=chunk, input_dtype=input_dtype, thresholds=pair).eval()
    crops = None if calibration is None else _calibration_crops(model, calibration, input_dtype)  # reads them now
    start = time.perf_counter()

    def write(folder: Path) -> dict:
        if format == "torchscript":
            return _write_torchscript(graph, folder / GRAPH_FILES[format])
        onnx_file = folder / GRAPH_FILES["onnx"]
        exporter = _write_onnx(graph, onnx_file, opset)
        if format == "openvino":
            _write_openvino(onnx_file, folder / GRAPH_FILES["openvino"])
        return {"exporter": exporter, "opset": opset}

    def write_all(folder: Path) -> None:
        details = write(folder)
        record = _record(model, graph, format, details, 0.0)
        if format != "torchscript":
            record["fast"] = _write_fast(model, graph.features, folder, format, opset, precision, crops, record)
        record["seconds"] = round(time.perf_counter() - start, 2)
        write_json_atomic(folder / RECORD, record)

    return write_sealed_folder(out, write_all)


def _check_precision(format: str, precision: str, calibration: Calibration | None) -> None:
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"export precision={precision!r}: choose one of {EXPORT_PRECISIONS}")
    if precision == "int8" and format == "torchscript":
        raise ValueError("export precision=int8 quantizes the fast form's feature graph, which format=torchscript "
                         "does not have: export format=onnx or openvino")
    if precision == "int8" and calibration is None:
        raise ValueError("export precision=int8 needs nominal images of the model's training set to calibrate on "
                         "(calibration.images; the export CLI finds them from the saved model's metadata)")


def _calibration_crops(model, calibration: Calibration, input_dtype: str) -> tuple:
    """The calibration and held-out crops as the graph takes them (uint8, or float 0-1)."""
    from core.api import prepare_images_uint8

    def crops(images) -> np.ndarray:
        batch = prepare_images_uint8(images, model)[0].numpy()
        return batch if input_dtype == "uint8" else batch.astype("float32") / 255

    calibrating, heldout = calibration.split()
    return crops(calibrating), crops(heldout), calibration


def _write_fast(model, features: ExportableFeatures, folder: Path, format: str, opset: int, precision: str,
                crops: tuple | None, record: dict) -> dict:
    """The fast form's files in ``folder``; returns its ``export.json`` node."""
    write_tensors(folder / BANK_FILE, {"features": model.bank.features.float()})
    node = {"file": FEATURE_FILES[format], "output": FEATURES_OUTPUT, "bank": BANK_FILE,
            "search": model.search.record(), "precision": precision, "drift": None}
    onnx_file = folder / FEATURE_FILES["onnx"]
    if precision == "float32":
        _write_onnx(features, onnx_file, opset, [FEATURES_OUTPUT])
    else:
        scratch = folder / "float32"  # removed below: the manifest lists the folder's files only
        scratch.mkdir()
        _write_onnx(features, scratch / onnx_file.name, opset, [FEATURES_OUTPUT])
        _write_int8(scratch / onnx_file.name, onnx_file, crops, {**record, "fast": node}, folder)
        shutil.rmtree(scratch)
        node["drift"] = DRIFT_FILE
    if format == "openvino":
        _write_openvino(onnx_file, folder / FEATURE_FILES["openvino"])
    return node


def _write_int8(float_onnx: Path, onnx_file: Path, crops: tuple, record: dict, folder: Path) -> None:
    """The INT8 feature graph at ``onnx_file`` and its drift record against ``float_onnx``."""
    from core.export.fast import FastForm
    from core.export.quantize import drift_record, quantize_features
    from core.export.sessions import onnx_runner

    calibrating, heldout, calibration = crops
    method = quantize_features(float_onnx, onnx_file, calibrating, INPUT_NAME)
    float32, int8 = (FastForm(folder, record, onnx_runner(path)) for path in (float_onnx, onnx_file))
    write_json_atomic(folder / DRIFT_FILE, drift_record(float32, int8, heldout, method, calibration))


def onnx_to_openvino(onnx_export: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """An ONNX export folder converted to OpenVINO IR (the same graph ``format=openvino`` would write,
    without tracing the model again)."""
    onnx_export, out = Path(onnx_export), Path(out)
    record = read_export_record(onnx_export)
    if record.get("format") != "onnx":
        raise ExportError(f"{onnx_export} is a {record.get('format')} export: pass an ONNX export folder")
    _check_target(out, overwrite)
    start = time.perf_counter()

    def write(folder: Path) -> None:
        _convert_openvino(onnx_export / record["file"], folder / GRAPH_FILES["openvino"])
        converted = {**record, "format": "openvino", "file": GRAPH_FILES["openvino"]}
        fast = record.get("fast")
        if fast is not None:  # the fast form: its feature graph converted, the bank (and drift record) copied
            _convert_openvino(onnx_export / fast["file"], folder / FEATURE_FILES["openvino"])
            for name in (fast["bank"], fast["drift"]):
                if name is not None:
                    shutil.copyfile(onnx_export / name, folder / name)
            converted["fast"] = {**fast, "file": FEATURE_FILES["openvino"]}
        converted["seconds"] = round(record.get("seconds", 0) + time.perf_counter() - start, 2)
        write_json_atomic(folder / RECORD, converted)

    return write_sealed_folder(out, write)


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if out.is_dir() and (out / RECORD).is_file():
        if overwrite:
            return
        raise ExportError(f"{out} already holds an exported model: pass overwrite=true to replace it, or choose "
                          f"another out folder")
    raise ExportError(f"{out} exists and is not an exported model (no {RECORD}): exporting there would replace "
                      f"its files; choose another out folder")


def _example(graph: ExportablePatchCore | ExportableFeatures) -> torch.Tensor:
    """Two images (one would let the exporters fix the batch size at 1)."""
    dtype = torch.uint8 if graph.input_dtype == "uint8" else torch.float32
    return torch.zeros(2, 3, *graph.input_size, dtype=dtype)


def _write_onnx(graph: torch.nn.Module, path: Path, opset: int, names: list[str] | None = None) -> str:
    """``torch.onnx.export``, the dynamo exporter first; returns the exporter's name. ``names``: the outputs
    (default: the graph's ``output_names``)."""
    names = names or graph.output_names
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(graph, (_example(graph),), str(path), input_names=[INPUT_NAME], output_names=names,
                          dynamo=True, opset_version=opset, dynamic_shapes={"images": {0: batch}},
                          external_data=True, verbose=False)
        exporter = "dynamo"
    except Exception as error:  # noqa: BLE001 - any failure of the new exporter: try the older one
        log.warning("the dynamo ONNX exporter failed (%s: %s); trying the TorchScript-based exporter",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        for leftover in path.parent.glob(f"{path.name}*"):
            leftover.unlink()
        axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in names}}
        try:
            torch.onnx.export(graph, (_example(graph),), str(path), input_names=[INPUT_NAME], output_names=names,
                              dynamo=False, opset_version=opset, dynamic_axes=axes)
        except Exception as second:  # noqa: BLE001 - report both exporters' reasons
            raise ExportError(f"neither ONNX exporter could export this model: dynamo: {error}; TorchScript-based: "
                              f"{second}. Try another opset (opset=...) or format=torchscript") from second
        exporter = "torchscript"
    _externalise(path)
    return exporter


def _externalise(path: Path) -> None:
    """Keep the tensors in one ``<name>.data`` file next to the graph, whichever exporter wrote it (protobuf
    files are capped at 2 GB, a 320k x 1024 bank alone is 1.3 GB)."""
    import onnx

    data = path.with_name(path.name + ".data")
    if data.is_file():
        return
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def _write_openvino(onnx_file: Path, xml_file: Path) -> None:
    _convert_openvino(onnx_file, xml_file)
    for path in onnx_file.parent.glob(f"{onnx_file.name}*"):  # the intermediate ONNX files
        path.unlink()


def _convert_openvino(onnx_file: Path, xml_file: Path) -> None:
    """OpenVINO IR from the ONNX graph, read by the runtime's ONNX frontend; weights kept in float32 (``save_model``
    would halve them to float16). Not ``openvino.convert_model``: that tool sends usage telemetry from a forked
    process, which without network hung the exporting process (a fork of a process running torch's and numba's
    threads) and which a factory's offline machine should not attempt at all."""
    import openvino

    from core.export.sessions import openvino_core

    openvino.save_model(openvino_core().read_model(str(onnx_file)), str(xml_file), compress_to_fp16=False)


def _write_torchscript(graph: ExportablePatchCore, path: Path) -> dict:
    with torch.no_grad(), warnings.catch_warnings():
        # the trace fixes Python-level sizes (grid, chunks, kernel): constant for this model, as intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, (_example(graph),), check_trace=False)
    traced.save(str(path))
    return {"exporter": "torch.jit.trace"}


def _record(model, graph: ExportablePatchCore, format: str, details: dict, seconds: float) -> dict:
    from core.model_files import versions
    from core.saved_model import preprocessing_record

    height, width = graph.input_size
    versions_now = versions()
    for package in ("onnx", "onnxruntime", "openvino"):
        try:
            versions_now[package] = __import__(package).__version__
        except ImportError:
            pass
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "format": format,
        "file": GRAPH_FILES[format],
        **details,
        "input": {"name": INPUT_NAME, "dtype": graph.input_dtype, "shape": ["batch", 3, height, width],
                  "range": RANGES[graph.input_dtype],
                  "layout": "NCHW, RGB, resized and centre-cropped as in preprocessing, not normalised"},
        "outputs": graph.output_names,
        "chunk": graph.search.chunk,
        "bank_size": graph.search.size,
        "embed_dim": graph.search.dim,
        "preprocessing": preprocessing_record(getattr(model, "preprocessing", None)),
        "threshold": getattr(model, "threshold", None),
        "model": json.loads(json.dumps(model.spec())),
        "grid": list(graph.embedding.grid),
        "seconds": round(seconds, 2),
        "versions": versions_now,
    }
