"""selection.json: what ``experiments/selection.py`` writes, and how ``main.py selection=<path>`` applies it.

The file's ``chosen`` maps each category to the main.py overrides of its chosen configuration (the select
run's own overrides, then the candidate's). ``main.py selection=<path> category=<name>`` puts them on the
command line before Hydra composes, so such a run is the very config of typing them by hand. Light on
purpose (json only): main.py reads it before torch is imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from core.io import read_record_text
from experiments.harness.overrides import override_key, renamed

FORMAT = "patchcore-selection"
VERSION = 1
# keys a selection may never set: they are the run's bookkeeping, not its configuration
RESERVED = ("hydra.", "selection", "category", "select.", "select/", "score_run")


def check_override(override: object, where: str) -> str:
    """One ``key=value`` override of a selection, or a ValueError naming it."""
    if not isinstance(override, str) or "=" not in override or override.startswith("-"):
        raise ValueError(f"{where}: {override!r} is not a main.py override (key=value)")
    key = override_key(override)
    if not key or any(key == r.rstrip("./") or key.startswith(r) for r in RESERVED):
        raise ValueError(f"{where}: {override!r} sets {key!r}, which a selection may not set")
    if message := renamed(override):
        raise ValueError(f"{where}: {message}")
    return override


def read_selection(path: str | Path) -> dict:
    """A complete, well-formed selection.json, or a ValueError that names the file and what to fix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"selection={path}: no such file; give the selection.json that experiments/selection.py "
                         "wrote into its run folder")
    try:
        record = json.loads(read_record_text(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"selection={path} cannot be read as JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"selection={path} is not a selection file (its 'format' is not {FORMAT!r})")
    if record.get("version") != VERSION:
        raise ValueError(f"selection={path} has version {record.get('version')!r}; this code reads version "
                         f"{VERSION}: run experiments/selection.py again")
    if record.get("complete") is not True:
        raise ValueError(f"selection={path} is unfinished (the select run was interrupted): run the same "
                         "experiments/selection.py command again to finish it")
    chosen = record.get("chosen")
    if not isinstance(chosen, dict) or not chosen:
        raise ValueError(f"selection={path} has no 'chosen' overrides per category")
    for category, overrides in chosen.items():
        if not isinstance(overrides, list):
            raise ValueError(f"selection={path}: chosen[{category!r}] must be a list of overrides")
        for override in overrides:
            check_override(override, f"selection={path}, chosen[{category!r}]")
    return record


def _value(argv: list[str], key: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in argv if arg.split("=", 1)[0] == key]
    return values[-1] if values else None


def _categories(value: str | None) -> list[str] | None:
    """The categories a category= value names, or None for ``all`` (the default)."""
    if value is None or value.strip() == "all":
        return None
    return [name.strip() for name in value.strip("[]").split(",") if name.strip()]


def selection_overrides(record: dict, path: str, category: str | None) -> list[str]:
    """The chosen overrides for ``category=`` (a name, a list, or all/None): one list, or a ValueError when the
    categories asked for were chosen differently (one run has one configuration) or were not selected."""
    chosen: dict[str, list[str]] = record["chosen"]
    names = _categories(category)
    missing = [name for name in names or [] if name not in chosen]
    if missing:
        raise ValueError(f"selection={path} has no choice for category {', '.join(missing)}; it covers "
                         f"{', '.join(chosen)}")
    picked = {name: chosen[name] for name in (names or chosen)}
    distinct = {json.dumps(v) for v in picked.values()}
    if len(distinct) > 1:
        raise ValueError(f"selection={path} chose different settings for {', '.join(picked)}, and one run has one "
                         "configuration: run each category on its own, "
                         + "; ".join(f"python experiments/main.py selection={path} category={n}" for n in picked))
    return list(next(iter(picked.values())))


def apply_selection(argv: Iterable[str]) -> list[str]:
    """The command line with ``selection=<path>`` replaced by its chosen overrides (placed first, so an override
    typed on the command line for the same key wins; it is said on stderr). Without selection= it is unchanged."""
    argv = list(argv)
    paths = [arg for arg in argv if arg.startswith("selection=")]
    if not paths:
        return argv
    if len(paths) > 1:
        raise ValueError(f"give one selection=, not {len(paths)}")
    path = paths[0].split("=", 1)[1]
    record = read_selection(path)
    rest = [arg for arg in argv if arg is not paths[0]]
    chosen = selection_overrides(record, path, _value(rest, "category"))
    typed = {override_key(arg) for arg in rest if "=" in arg and not arg.startswith("-")}
    kept = [o for o in chosen if override_key(o) not in typed]
    if len(kept) < len(chosen):
        import sys

        dropped = [o for o in chosen if o not in kept]
        print(f"note: the command line replaces the selection's {' '.join(dropped)}", file=sys.stderr)
    return [*kept, *rest]
