"""The checks every saved record shares (a saved model's ``model.json``, PatchCore's or the CAE's, and an
export's ``export.json``): read it safely, check it against a schema table, and the two nodes several
records hold, the decision thresholds and the preprocessing.

A manifest is a checksum list, not a signature: whoever can edit a folder can re-hash it. So every value
of a record is hostile input, checked for type, finiteness and range here, at load, before any tensor is
read, so a bad value is refused by its key in a second instead of failing (or deciding wrongly) at predict.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from core.data import DatasetError, Preprocessing
from core.io import FileSizeError, NotRegularFileError, read_record_text


class RecordError(ValueError):
    """A saved record does not fit its schema; the message says which key and why."""


# The largest image side a saved record may name (input_size, preprocessing.resize / image_size): beyond the
# largest crop any backbone here takes (518 px) by far, while one 4096 x 4096 RGB float image is 200 MB; a
# record asking for more (a 60000 px resize asks for a 10.8 GB image) is a typo or hostile.
MAX_SIDE = 4096


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a regular file of at most ``core.io.MAX_RECORD_BYTES``); anything else,
    invalid JSON or another JSON value is a ``RecordError`` naming the file."""
    try:
        record = json.loads(read_record_text(path))
    except (NotRegularFileError, FileSizeError) as error:
        raise RecordError(str(error)) from None
    except UnicodeDecodeError as error:
        raise RecordError(f"{path} is not a text file ({error})") from None
    except json.JSONDecodeError as error:
        raise RecordError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path} holds a JSON {type(record).__name__}, not an object")
    return record


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A finite int or float (JSON's NaN and Infinity are read as floats, and are refused here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def setting_integer(key: str, value: object, minimum: int, maximum: int | None = None, note: str = "") -> int:
    """A constructor's integer setting, checked; the message names the user-facing ``key`` (e.g.
    ``patchcore.scoring.num_neighbors``): the one wording for every core class's integer settings."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{key}={value!r} must be an integer {bounds}{note}")
    return int(value)


def setting_number(key: str, value: object, valid, what: str) -> float:
    """A constructor's real-valued setting, finite and ``valid``; ``what`` says the valid range."""
    if not is_finite(value):
        raise ValueError(f"{key}={value!r} must be a finite number {what}")
    if not valid(value):
        raise ValueError(f"{key}={value!r} must be {what}")
    return float(value)


def is_side(value) -> bool:
    return is_int(value) and 1 <= value <= MAX_SIDE


# key -> (required, check, what it must be). A check returns whether the value fits, or raises RecordError
# with a message of its own (naming the sub-key, e.g. threshold.image_threshold).
Schema = dict[str, tuple[bool, Callable[[object], bool], str]]


def check_schema(record: dict, schema: Schema, version: int) -> None:
    """Raise ``RecordError`` saying what is wrong with ``record``: an older ``format_version`` (first: an older
    layout fails the schema anyway), an unknown key, a missing key, a value that does not fit."""
    found = record.get("format_version")
    if is_int(found) and found < version:
        raise RecordError(f"it was written by an earlier version of this code (format_version={found}), which "
                          f"this version (format {version}) does not read")
    unknown = sorted(set(record) - set(schema))
    if unknown:
        raise RecordError(f"unknown keys {unknown}")
    for key, (required, check, what) in schema.items():
        if key not in record:
            if required:
                raise RecordError(f"the key {key!r} is missing")
            continue
        if not check(record[key]):
            raise RecordError(f"{key}={record[key]!r} must be {what}")
    if record["format_version"] != version:
        raise RecordError(f"format_version={record['format_version']} but this code reads version {version}")


def check_threshold(value, key: str = "threshold") -> bool:
    """A threshold record: null, or an object whose ``image_threshold`` and ``pixel_threshold`` are finite
    numbers or null and whose ``min_defect_area`` is an integer >= 0 or null (its other keys describe the rule
    and are not read). A NaN threshold would read every score as nominal (``score >= NaN`` is False)."""
    if value is None:
        return True
    if not isinstance(value, dict):
        raise RecordError(f"{key}={value!r} must be null or an object (image_threshold, pixel_threshold, "
                          f"min_defect_area)")
    for name in ("image_threshold", "pixel_threshold"):
        if value.get(name) is not None and not is_finite(value[name]):
            raise RecordError(f"{key}.{name}={value[name]!r} must be a finite number or null (a NaN or infinite "
                              f"threshold decides nothing)")
    area = value.get("min_defect_area")
    if area is not None and not (is_int(area) and area >= 0):
        raise RecordError(f"{key}.min_defect_area={area!r} must be an integer >= 0 (pixels) or null")
    return True


_PREPROCESSING_KEYS = frozenset(field.name for field in dataclasses.fields(Preprocessing))


def check_preprocessing(value, key: str = "preprocessing", input_size: list | None = None) -> bool:
    """A ``Preprocessing`` record: null, or an object with its fields only: ``resize`` and ``image_size``
    integers in [1, MAX_SIDE], ``mean`` three finite numbers, ``std`` three finite numbers > 0; the rest
    through ``Preprocessing``'s own constructor. With ``input_size`` ([H, W], the crop the model was fitted
    on), the crop ``image_size`` must be that size: another crop scores images the bank never saw."""
    if value is None:
        return True
    if not isinstance(value, dict) or not set(value) <= _PREPROCESSING_KEYS:
        raise RecordError(f"{key}={value!r} must be null or an object with keys among {sorted(_PREPROCESSING_KEYS)}")
    for name in ("resize", "image_size"):
        if name in value and not is_side(value[name]):
            raise RecordError(f"{key}.{name}={value[name]!r} must be an integer in [1, {MAX_SIDE}] (pixels)")
    for name, low in (("mean", None), ("std", 0.0)):
        if name not in value:
            continue
        numbers = value[name]
        if not (isinstance(numbers, list) and len(numbers) == 3 and all(is_finite(v) for v in numbers)
                and (low is None or all(v > low for v in numbers))):
            what = "three finite numbers" + (" > 0 (images are divided by it)" if low is not None else "")
            raise RecordError(f"{key}.{name}={numbers!r} must be {what}")
    try:
        preprocessing = Preprocessing(**value)
    except (DatasetError, TypeError, ValueError) as error:
        raise RecordError(f"{key}: {error}") from None
    if input_size and list(input_size) != [preprocessing.image_size] * 2:
        raise RecordError(f"{key}.image_size={preprocessing.image_size} but the model was fitted on "
                          f"{input_size[0]}x{input_size[1]} crops (input_size={list(input_size)}): it must equal "
                          f"input_size")
    return True
