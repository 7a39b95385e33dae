"""``export.json``, the record of an exported folder: its schema, and reading it through the same gate as a
saved model's ``model.json`` (``core.model_files.verify_manifest``: regular files of their recorded sizes,
the record hashed and checked before the graph is).

An export may come from anywhere, and its manifest can be re-hashed by whoever edits it, so every key is
checked at load for type and range: ``file`` must be the format's own graph file inside the folder (an
absolute or ``../`` path would run a graph from elsewhere), ``outputs`` exactly the names the graph returns
in its order (a reordered list would label the maps as scores), the thresholds finite.

The fast form (``fast``: the feature graph, the bank, the search settings, the precision and, for INT8, the
drift record) is checked the same way: fixed file names per format, the precision and its drift record
together; the bank file and the settings are then read by ``core.export.fast`` through their own checks.
"""

from __future__ import annotations

from pathlib import Path

from core.export.graph import INPUT_DTYPES
from core.model_files import ModelFilesError, verify_manifest
from core.records import (
    RecordError,
    Schema,
    check_preprocessing,
    check_schema,
    check_threshold,
    is_finite,
    is_int,
    is_side,
    read_json_object,
)
from core.saved_model import BANK_FILE
from core.search.options import SearchOptions

FORMATS = ("onnx", "openvino", "torchscript")
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
RECORD = "export.json"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME = "images"
# The graph's outputs, in its order: scores and maps; with an image threshold its decisions; with a pixel
# threshold too, its masks.
OUTPUTS = ("image_scores", "anomaly_maps", "image_decisions", "anomaly_masks")
RANGES = {"uint8": "0-255", "float32": "0-1"}
# The fast form: the graph up to the patch features (per format), its output, the bank (as a saved model's), the
# feature graph's precision, and the INT8 drift record (core.export.quantize).
FEATURE_FILES = {"onnx": "features.onnx", "openvino": "features.xml"}
FEATURES_OUTPUT = "patch_features"
EXPORT_PRECISIONS = ("float32", "int8")
DRIFT_FILE = "int8_drift.json"
_SEARCH_KEYS = frozenset(SearchOptions.__dataclass_fields__)


class ExportedModelError(ValueError):
    """An exported folder that cannot be run, or an input it cannot take; the message names the file and fix."""


def _input(value) -> bool:
    """``{"name", "dtype", "shape": ["batch", 3, H, W], "range", "layout"}``, the range the dtype's."""
    if not (isinstance(value, dict) and set(value) == {"name", "dtype", "shape", "range", "layout"}):
        return False
    shape = value["shape"]
    return (isinstance(value["name"], str) and value["dtype"] in INPUT_DTYPES and isinstance(shape, list)
            and len(shape) == 4 and shape[:2] == ["batch", 3] and all(is_side(side) for side in shape[2:])
            and value["range"] == RANGES[value["dtype"]] and isinstance(value["layout"], str))


def _positive(value) -> bool:
    return is_int(value) and value > 0


def _fast(value) -> bool:
    """``{"file", "output", "bank", "search", "precision", "drift"}``: fixed names, the search node's keys
    ``SearchOptions``' (whose constructor checks the values at load), the drift record with INT8 only."""
    if not (isinstance(value, dict) and set(value) == {"file", "output", "bank", "search", "precision", "drift"}):
        return False
    search = value["search"]
    return (value["file"] in FEATURE_FILES.values() and value["output"] == FEATURES_OUTPUT
            and value["bank"] == BANK_FILE and isinstance(search, dict) and set(search) <= _SEARCH_KEYS
            and value["precision"] in EXPORT_PRECISIONS
            and value["drift"] == (DRIFT_FILE if value["precision"] == "int8" else None))


EXPORT_SCHEMA: Schema = {
    "format_version": (True, is_int, "an integer"),
    "format": (True, lambda v: v in FORMATS, f"one of {list(FORMATS)}"),
    "file": (True, lambda v: v in GRAPH_FILES.values(), f"the graph file, a plain name inside the folder (one of "
             f"{sorted(GRAPH_FILES.values())})"),
    "exporter": (False, lambda v: isinstance(v, str), "a string"),
    "opset": (False, _positive, "a positive integer"),
    "input": (True, _input, "an object {\"name\", \"dtype\": \"uint8\" | \"float32\", \"shape\": [\"batch\", 3, H, W] "
              "(H, W integers in [1, 4096]), \"range\": \"0-255\" | \"0-1\" (the dtype's), \"layout\"}"),
    "outputs": (True, lambda v: isinstance(v, list) and 2 <= len(v) <= 4 and tuple(v) == OUTPUTS[:len(v)],
                f"the graph's output names in its order: {list(OUTPUTS[:2])}, then 'image_decisions' and "
                f"'anomaly_masks' with thresholds"),
    "fast": (False, _fast, f"an object {{\"file\": one of {sorted(FEATURE_FILES.values())}, \"output\": "
             f"{FEATURES_OUTPUT!r}, \"bank\": {BANK_FILE!r}, \"search\": the search settings, \"precision\": one of "
             f"{list(EXPORT_PRECISIONS)}, \"drift\": {DRIFT_FILE!r} with int8, else null}}"),
    "chunk": (True, _positive, "a positive integer"),
    "bank_size": (True, _positive, "a positive integer"),
    "embed_dim": (True, _positive, "a positive integer"),
    "preprocessing": (True, check_preprocessing, "null or an object (resize, image_size, mean, std, interpolation)"),
    "threshold": (True, check_threshold, "null or an object (image_threshold, pixel_threshold, min_defect_area)"),
    "model": (True, lambda v: isinstance(v, dict), "an object (the source model's spec)"),
    "grid": (True, lambda v: isinstance(v, list) and len(v) == 2 and all(is_side(side) for side in v),
             "[h, w] (positive integers)"),
    "seconds": (True, lambda v: is_finite(v) and v >= 0, "a finite number >= 0"),
    "versions": (True, lambda v: isinstance(v, dict), "an object"),
}


def check_export_record(record: dict) -> None:
    """``RecordError`` saying what is wrong with an ``export.json`` record: its schema, then the keys that
    depend on each other (the graph file of the format; the crop the input's; outputs and thresholds)."""
    check_schema(record, EXPORT_SCHEMA, EXPORT_FORMAT_VERSION)
    if record["file"] != GRAPH_FILES[record["format"]]:
        raise RecordError(f"file={record['file']!r} but a {record['format']} export's graph is "
                          f"{GRAPH_FILES[record['format']]!r}")
    fast = record.get("fast")
    if fast is not None and fast["file"] != FEATURE_FILES.get(record["format"]):
        raise RecordError(f"fast.file={fast['file']!r} but a {record['format']} export's feature graph is "
                          f"{FEATURE_FILES.get(record['format'])!r}")
    check_preprocessing(record["preprocessing"], "preprocessing", record["input"]["shape"][2:])
    threshold = record["threshold"] or {}
    expected = 2 + (threshold.get("image_threshold") is not None) + (threshold.get("pixel_threshold") is not None)
    if len(record["outputs"]) != expected:
        raise RecordError(f"outputs={record['outputs']} but threshold={record['threshold']!r} makes the graph return "
                          f"{list(OUTPUTS[:expected])}")


def read_export_record(folder: Path) -> dict:
    """``export.json`` of an exported folder, through the manifest gate and ``check_export_record``.
    Raises ``FileNotFoundError`` (no export), ``ModelFilesError`` (files) or ``ExportedModelError`` (record)."""
    folder = Path(folder)
    record_file = folder / RECORD
    if not record_file.exists() and not record_file.is_symlink():
        raise FileNotFoundError(f"{folder} is not an exported model (it has no {RECORD}): pass the out folder of "
                                f"`python experiments/export.py model_dir=... out=...`")
    found: dict = {}

    def check() -> None:
        found["record"] = read_json_object(record_file)
        check_export_record(found["record"])

    try:
        verify_manifest(folder, first=(RECORD,), check=check)
    except RecordError as error:
        raise ExportedModelError(f"{record_file} is not valid: {error}; export the model again with this "
                                 f"code") from None
    except ModelFilesError as error:
        raise ModelFilesError(f"exported model {folder} is not valid: {error}") from None
    return found["record"]
