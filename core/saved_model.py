"""The schema of a saved model's ``model.json``, checked before anything is built from it.

A saved model may come from anywhere (a colleague, a download, a tampered copy), so every key is
checked for its type and range before the extractor is resolved or a tensor is read: a file that
does not fit says *what* is wrong, not a traceback from deep inside the constructor. The extractor
target itself is checked by ``core.backbones.build_extractor`` (FeatureExtractor classes only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path


class RecordError(ValueError):
    """A saved record does not fit its schema; the message says which key and why."""


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; invalid JSON or another JSON value is a ``RecordError`` naming the file."""
    try:
        record = json.loads(Path(path).read_text())
    except UnicodeDecodeError as error:
        raise RecordError(f"{path} is not a text file ({error})") from None
    except json.JSONDecodeError as error:
        raise RecordError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path} holds a JSON {type(record).__name__}, not an object")
    return record


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _size(value) -> bool:  # [] (not recorded) or two positive ints
    return isinstance(value, list) and (value == [] or (len(value) == 2 and all(_int(v) and v > 0 for v in value)))


def _spec(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("target"), str)
            and isinstance(value.get("kwargs", {}), dict))


def _embedder(value) -> bool:
    return (isinstance(value, dict) and (value.get("embed_dim") is None or (_int(value["embed_dim"])
            and value["embed_dim"] > 0)) and _int(value.get("patch_size")) and value["patch_size"] > 0
            and isinstance(value.get("aggregation", "channel_mean"), str) and "embed_dim" in value)


# key -> (required, check, what it must be). Keys named like a PatchCore constructor parameter (the
# scoring settings spec() records) are accepted too, and checked by the constructor itself.
MODEL_SCHEMA: dict[str, tuple[bool, Callable[[object], bool], str]] = {
    "format_version": (True, _int, "an integer"),
    "extractor": (True, _spec, "an object {\"target\": \"<module>.<Class>\", \"kwargs\": {...}}"),
    "embedder": (True, _embedder, "an object {\"embed_dim\": int or null, \"patch_size\": int, \"aggregation\"}"),
    "num_neighbors": (True, lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "reweight_neighbors": (True, lambda v: v is None or (_int(v) and v >= 1), "null or an integer >= 1"),
    "blur_sigma": (True, lambda v: _number(v) and v >= 0, "a number >= 0"),
    "distance": (False, lambda v: isinstance(v, str), "a string"),
    "grid": (True, _size, "[] or [h, w] (positive integers)"),
    "input_size": (True, _size, "[] or [H, W] (positive integers)"),
    "bank_size": (True, lambda v: _int(v) and v > 0, "a positive integer"),
    "search": (False, lambda v: isinstance(v, dict), "an object of search settings"),
    "search_strategy": (False, lambda v: isinstance(v, str), "a string"),
    "metadata": (False, lambda v: isinstance(v, dict), "an object"),
    "model": (False, lambda v: v == "patchcore", "\"patchcore\" (another kind is loaded by its own class)"),
}


def check_model_record(record: dict, version: int, constructor_keys: Iterable[str], search_keys: Iterable[str]) -> None:
    """Raise ``RecordError`` saying what is wrong with a PatchCore ``model.json`` record, if anything."""
    allowed = set(MODEL_SCHEMA) | set(constructor_keys)
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise RecordError(f"unknown keys {unknown}")
    for key, (required, check, what) in MODEL_SCHEMA.items():
        if key not in record:
            if required:
                raise RecordError(f"the key {key!r} is missing")
            continue
        if not check(record[key]):
            raise RecordError(f"{key}={record[key]!r} must be {what}")
    if record["format_version"] != version:
        raise RecordError(f"format_version={record['format_version']} but this code reads version {version}")
    unknown_search = sorted(set(record.get("search", {})) - set(search_keys))
    if unknown_search:
        raise RecordError(f"unknown search settings {unknown_search} (known: {sorted(search_keys)})")
