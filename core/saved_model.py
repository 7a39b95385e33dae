"""A saved PatchCore folder: its files, the schema of its ``model.json``, and rebuilding its extractor.

A saved model may come from anywhere (a colleague, a download, a tampered copy), so its files are first
checked against the folder's SHA-256 manifest (``core.model_files``), then the structure of ``model.json``
(every key's type; the nodes rebuilt by a constructor, ``scoring`` and ``search``, may hold only that
constructor's keywords) before the extractor is resolved or a tensor is read: a file that does not fit
says *what* is wrong, not a traceback. The ranges of the settings are checked by the constructors the
model is rebuilt through, the one place they are checked. The extractor target itself is checked by
``core.backbones.build_extractor`` (FeatureExtractor classes only).

Two forms (``model.json``'s ``weights``): self-contained (``extractor.safetensors`` holds the extractor's
weights; the network is built with random weights and no lookup, then loaded, so an empty weights cache
is fine) and spec-only (``weights: null``; the extractor is rebuilt from its spec and its weights
source, the torch or Hugging Face cache or a file, as when it was fitted).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from core.model_files import ModelFilesError, read_tensors, verify_manifest
from core.records import (
    MAX_SIDE,
    RecordError,
    Schema,
    check_preprocessing,
    check_schema,
    check_threshold,
    is_int,
    is_side,
    read_json_object,
)
from core.scoring import ScoringHead
from core.search.options import SearchOptions

BANK_FILE = "bank.safetensors"
WEIGHTS_FILE = "extractor.safetensors"


def _size(value) -> bool:  # [] (not recorded) or two ints in [1, MAX_SIDE]
    return isinstance(value, list) and (value == [] or (len(value) == 2 and all(is_side(v) for v in value)))


def _spec(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("target"), str)
            and isinstance(value.get("kwargs", {}), dict))


def _weights(value) -> bool:  # null (spec-only) or {"file": a plain file name, "extractor": a spec}
    return value is None or (isinstance(value, dict) and set(value) == {"file", "extractor"}
                             and value["file"] == WEIGHTS_FILE and _spec(value["extractor"]))


# Bounds of the embedder's numbers in a saved record, far beyond any real model (the widest embedding here is
# a few thousand channels; the paper's neighbourhood is 3 x 3) and far below what a hostile record would need to
# ask for a many-GB allocation at the first prediction.
MAX_EMBED_DIM = 1 << 16
MAX_PATCH_SIZE = 255


def _embedder(value) -> bool:
    return (isinstance(value, dict) and (value.get("embed_dim") is None or (is_int(value["embed_dim"])
            and 0 < value["embed_dim"] <= MAX_EMBED_DIM)) and is_int(value.get("patch_size"))
            and 0 < value["patch_size"] <= MAX_PATCH_SIZE
            and isinstance(value.get("aggregation", "channel_mean"), str) and "embed_dim" in value)


def _keywords(cls: type) -> frozenset[str]:
    """The keyword parameters of ``cls``'s constructor: the keys a node rebuilt through it may hold."""
    return frozenset(name for name in inspect.signature(cls).parameters if name != "self")


# The nodes of model.json rebuilt through a constructor: only its keywords are allowed (their values are
# checked by the constructor itself).
NODES = {"scoring": _keywords(ScoringHead), "search": _keywords(SearchOptions)}


def _node(name: str, required: bool) -> Callable[[object], bool]:
    keys = NODES[name]
    return lambda value: isinstance(value, dict) and (set(value) == keys if required else set(value) <= keys)


def metadata_node(value) -> bool:
    """The caller's object; its ``threshold`` and ``preprocessing``, where the harness stores them, are read by
    ``experiments/predict.py`` when the model itself holds none, so they are checked as the model's own."""
    return (isinstance(value, dict) and check_threshold(value.get("threshold"), "metadata.threshold")
            and check_preprocessing(value.get("preprocessing"), "metadata.preprocessing"))


MODEL_SCHEMA: Schema = {
    "format_version": (True, is_int, "an integer"),
    "extractor": (True, _spec, "an object {\"target\": \"<module>.<Class>\", \"kwargs\": {...}}"),
    "embedder": (True, _embedder, f"an object {{\"embed_dim\": int in [1, {MAX_EMBED_DIM}] or null, "
                 f"\"patch_size\": int in [1, {MAX_PATCH_SIZE}], \"aggregation\"}}"),
    "scoring": (True, _node("scoring", required=True), f"an object with exactly the keys {sorted(NODES['scoring'])}"),
    "grid": (True, _size, f"[] or [h, w] (integers in [1, {MAX_SIDE}])"),
    "input_size": (True, _size, f"[] or [H, W] (integers in [1, {MAX_SIDE}] pixels)"),
    "bank_size": (True, lambda v: is_int(v) and v > 0, "a positive integer"),
    "search": (False, _node("search", required=False), f"an object with keys among {sorted(NODES['search'])}"),
    "search_strategy": (False, lambda v: isinstance(v, str), "a string"),
    "metadata": (False, metadata_node, "an object"),
    "model": (False, lambda v: v == "patchcore", "\"patchcore\" (another kind is loaded by its own class)"),
    "weights": (True, _weights, f"null (spec-only) or {{\"file\": \"{WEIGHTS_FILE}\", \"extractor\": a spec}}"),
    "preprocessing": (False, check_preprocessing, "null or an object (resize, image_size, mean, std, interpolation)"),
    "threshold": (False, check_threshold, "null or an object (image_threshold, pixel_threshold, min_defect_area)"),
    "versions": (False, lambda v: isinstance(v, dict), "an object"),
}


def check_model_record(record: dict, version: int) -> None:
    """Raise ``RecordError`` saying what is wrong with a PatchCore ``model.json`` record, if anything: its
    kind, then schema, then the values that depend on each other."""
    if record.get("model", "patchcore") != "patchcore":  # before the format: another kind has its own versions
        raise RecordError(f"model={record['model']!r}: it is not a PatchCore model (core.detector.load_detector "
                          f"loads each kind by its own class)")
    check_schema(record, MODEL_SCHEMA, version)
    grid, size = record["grid"], record["input_size"]
    if grid and size and (grid[0] > size[0] or grid[1] > size[1]):
        raise RecordError(f"grid={grid} is finer than input_size={size}: a patch grid has at most one patch per pixel")
    check_preprocessing(record.get("preprocessing"), "preprocessing", size)


def model_parts(record: dict, where: str, search: SearchOptions | None = None) -> dict:
    """The settings of a checked record rebuilt through their constructors (which check every range: the one
    place), ``{"embedder", "scoring", "search", "preprocessing"}``; ``RecordError`` naming the key otherwise,
    or when the scoring head asks for more neighbours than the bank holds."""
    from core.data import Preprocessing
    from core.features import PatchEmbedder

    try:
        parts = {"embedder": PatchEmbedder.from_spec(record["embedder"]),
                 "scoring": ScoringHead(**record["scoring"]),
                 "search": search or SearchOptions.from_record(record.get("search", {}), where=where),
                 "preprocessing": Preprocessing(**record["preprocessing"]) if record.get("preprocessing") else None}
    except (ValueError, TypeError) as error:  # a setting out of range
        raise RecordError(str(error)) from None
    for key in ("num_neighbors", "reweight_neighbors"):
        value = getattr(parts["scoring"], key)
        if value is not None and value > record["bank_size"]:
            raise RecordError(f"scoring.{key}={value} but the bank holds bank_size={record['bank_size']} rows: it "
                              f"must be at most {record['bank_size']}")
    return parts


class SpecOnlyWeightsError(FileNotFoundError):
    """A spec-only saved model whose extractor weights cannot be found; the message says how to provide them."""


def read_saved_record(directory: Path, check: Callable[[dict], None]) -> dict:
    """``model.json`` of a saved folder through the one gate every saved model passes: the manifest's cheap
    checks (every file a regular file of its recorded size), ``model.json``'s digest, ``check(record)`` (its
    schema and values: ``RecordError``), only then the digests of the large files. Raises ``ModelFilesError``
    naming the file and the fix."""
    spec_file = Path(directory) / "model.json"
    found: dict = {}

    def check_record() -> None:
        found["record"] = read_json_object(spec_file)
        check(found["record"])

    try:
        verify_manifest(directory, first=("model.json",), check=check_record)
    except RecordError as error:
        raise ModelFilesError(f"model {spec_file} is not valid: {error}; refit it") from None
    except ModelFilesError as error:
        raise ModelFilesError(f"saved model {directory} is not valid: {error}") from None
    return found["record"]


def saved_kind(directory: Path) -> str | None:
    """The ``model`` key of a saved folder's ``model.json`` (``"patchcore"``, ``"cae"``, or None when absent
    or unreadable): only which loader to call; that loader's gate checks the folder, this value included."""
    try:
        kind = read_json_object(Path(directory) / "model.json").get("model")
    except (RecordError, OSError):
        return None
    return kind if isinstance(kind, str) else None


def read_record(directory: Path, version: int) -> tuple[dict, dict]:
    """``model.json`` of a saved PatchCore folder, checked (manifest, schema, values), and its settings
    rebuilt (``model_parts``). Raises ``FileNotFoundError`` for a folder that is no saved model,
    ``ModelFilesError`` (naming the file) otherwise."""
    directory = Path(directory)
    if not os.path.lexists(directory / "model.json"):
        raise FileNotFoundError(f"{directory} is not a saved PatchCore model (it has no model.json): pass the "
                                f"models/<category>/ folder of a run with save_model=true")
    if (directory / "bank.pt").is_file():
        raise ModelFilesError(f"saved model {directory} was written by an earlier version of this code (format 1: "
                              f"bank.pt, no manifest), which this version does not read; refit it (save_model=true)")
    parts: dict = {}

    def check(record: dict) -> None:
        check_model_record(record, version)
        parts.update(model_parts(record, str(directory)))

    return read_saved_record(directory, check), parts


def preprocessing_record(preprocessing) -> dict | None:
    """The ``Preprocessing`` a model was fitted with, as JSON (None when the fit's dataset recorded none)."""
    return None if preprocessing is None else json.loads(json.dumps(dataclasses.asdict(preprocessing)))


def load_extractor(directory: Path, record: dict):
    """The saved model's extractor: self-contained, built without any weights lookup and loaded from
    ``extractor.safetensors`` (strictly); spec-only, rebuilt from the spec and its weights source.
    Raises ``UntrustedSpecError``/``TypeError`` (not buildable), ``ModelFilesError`` (weights that do not
    fit) or ``SpecOnlyWeightsError`` (a spec-only model's weights are missing)."""
    from core.backbones import WeightsNotFoundError, build_extractor
    from core.backbones.build import checked_spec

    checked_spec(record["extractor"])  # the spec the model names must be a trusted one, even when not built
    weights = record["weights"]
    if weights is None:
        try:
            return build_extractor(record["extractor"])
        except (WeightsNotFoundError, FileNotFoundError) as error:  # a missing file, cache entry, checkpoint
            raise SpecOnlyWeightsError(
                f"saved model {directory} is spec-only (saved with save_model=spec_only: no weights inside), and "
                f"its extractor's weights were not found: {error} Alternatively save the model with "
                f"save_model=true, which puts the weights into the folder") from None
    with _quiet_random_weights():
        extractor = build_extractor(weights["extractor"])
    state = read_tensors(directory / weights["file"], "extractor weights")
    try:
        extractor.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFilesError(f"extractor weights {directory / weights['file']} do not fit the network "
                              f"{weights['extractor']['target']} ({str(error).splitlines()[0]})") from None
    extractor.eval()
    preprocessing = record.get("preprocessing") or {}
    if preprocessing.get("interpolation"):  # e.g. open_clip: the tag's, not the first listed tag's
        extractor.interpolation = preprocessing["interpolation"]
    extractor.name = record["extractor"].get("kwargs", {}).get("name") or extractor.name
    if extractor.spec()["target"] == record["extractor"]["target"]:  # spec() names the weights' source again
        extractor._spec_kwargs = dict(record["extractor"].get("kwargs", {}))
    return extractor


class _RandomWeightsNotice(logging.Filter):
    """The 'random weights: only to try the pipeline' warning is wrong here: the weights are loaded next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "random weights" not in record.getMessage()


@contextmanager
def _quiet_random_weights():
    notice = _RandomWeightsNotice()
    loggers = [logging.getLogger(name) for name in ("core.backbones.openclip", "core.backbones.timm")]
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)
