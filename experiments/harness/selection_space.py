"""The candidate space of configuration selection (conf/select/space/<name>.yaml; docs/selection.md): the
candidates it lists, the main.py overrides of each, and the check that the command does not also set what
the space varies.

A candidate is the command's main.py overrides plus its own. A ``backbones:`` option replaces the command's
backbone (its ``backbone`` and ``backbone.*`` overrides are dropped for that candidate), and the ``layers:``
table applies per backbone name: to the command's backbone and to each backbone option (a fine-tuned
backbone's layers are its checkpoint's, so none apply to it).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from experiments.harness.overrides import override_key as key_of
from experiments.harness.overrides import renamed_overrides
from experiments.harness.selection_file import check_override

BASE = "base"  # the candidate that is the run's own configuration (always first)
OWN_KEYS = ("select.", "select/", "score_run", "hydra.", "category")  # selection.py's own keys, not main.py's


class Candidate(NamedTuple):
    name: str
    overrides: list[str]  # what the candidate changes (its backbone option's overrides first)
    backbone: tuple[str, ...] = ()  # its backbone option's overrides; () for the command's own backbone


def backbone_name(option: Sequence[str]) -> str:
    """The conf/backbone name a ``backbones:`` option chooses (its ``backbone=<name>``; "" if none)."""
    return next((o.split("=", 1)[1] for o in option if key_of(o) == "backbone"), "")


def is_backbone_key(key: str) -> bool:
    return key == "backbone" or key.startswith("backbone.")


def main_overrides(task: Sequence[str]) -> list[str]:
    """The select command's overrides that are main.py's (the base every candidate starts from)."""
    return [o for o in task if not any(o.lstrip("+~").startswith(k) for k in OWN_KEYS)]


def backbone_options(space: Mapping) -> list[tuple[str, ...]]:
    """The space's ``backbones:`` options, each checked (it must choose a backbone: ``backbone=<name>``)."""
    options = [tuple(option) for option in space.get("backbones") or []]
    for option in options:
        if option and not any(key_of(o) == "backbone" for o in option if isinstance(o, str)):
            raise ValueError(f"select/space backbones option {list(option)} must choose one: backbone=<name> "
                             "(conf/backbone/), then its settings")
    return options


def candidates(space: Mapping, layer_keys: Mapping[tuple[str, ...], str | None]) -> list[Candidate]:
    """Every candidate of the space (conf/select/space/default.yaml says the format). ``layer_keys``: the
    ``layers:`` table's key of the command's backbone (under ``()``) and of each backbone option (its
    backbone.name; None for a fine-tuned one)."""
    axes = {name: [list(option) for option in options] for name, options in (space.get("axes") or {}).items()}
    table = space.get("layers") or {}

    def layers(backbone: tuple[str, ...]) -> list[list[str]]:
        key = layer_keys.get(backbone)
        return [list(option) for option in table.get(key) or []] if key is not None else []

    combine = space.get("combine", "one_at_a_time")
    options = backbone_options(space)
    if combine == "one_at_a_time":
        found = [Candidate(BASE, [])]
        found += [Candidate(f"{axis}:{' '.join(o)}", o) for axis, choices in axes.items() for o in choices]
        found += [Candidate(f"layers:{' '.join(o)}", o) for o in layers(())]
        found += [Candidate(f"backbone:{' '.join(b)}", list(b), b) for b in options if b]
    elif combine == "grid":
        found = []
        for backbone in options or [()]:
            parts = [*(choices or [[]] for choices in axes.values()), layers(backbone) or [[]]]
            for combo in itertools.product(*parts):
                overrides = [*backbone, *(o for part in combo for o in part)]
                found.append(Candidate(" ".join(overrides) or BASE, overrides, backbone))
    else:
        raise ValueError(f"select/space combine={combine!r}: choose one_at_a_time or grid")
    for candidate in found:
        for override in candidate.overrides:
            check_override(override, f"select/space candidate {candidate.name!r}")
    return found


def with_base(base: Sequence[str], candidate: Candidate) -> list[str]:
    """The candidate's whole main.py overrides: the command's, less its backbone when the candidate brings one."""
    kept = [o for o in base if not (candidate.backbone and is_backbone_key(key_of(o)))]
    return [*kept, *candidate.overrides]


def check_base(base: Sequence[str], found: Sequence[Candidate]) -> None:
    """The command may not set a key the space varies (which one would win is ambiguous): named now. A backbone
    option replaces the command's backbone settings, so those do not clash with it."""
    if problems := renamed_overrides(base):
        raise ValueError("; ".join(problems))
    varied = {key_of(o) for c in found for o in c.overrides[len(c.backbone):]}
    clash = sorted(varied & {key_of(o) for o in base})
    if clash:
        raise ValueError(f"{', '.join(clash)} is varied by the candidate space: drop it from the command, or "
                         "choose a space without it (select/space=<name>, conf/select/space/)")
