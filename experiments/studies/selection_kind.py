"""The study's ``selection`` comparison (docs/selection.md, "How far it can be trusted"): how far the label-free
choice of experiments/selection.py can be trusted, measured on the test set.

YAML: ``selection: {space: default, overrides: [...]}`` (``overrides``: the select job's own settings, e.g.
``select.metric=image_auroc``). Per seed the planner runs one ``experiments/selection.py`` job (the study's
and the dataset's main.py overrides as its base, ``seed`` and ``select.seed`` the study seed) and one
PatchCore run per candidate of the space (its overrides on the same base), so every candidate has its proxy
score (selection.json) and its test metrics (results.json) at every seed; the ``base`` candidate is the
baseline run itself. The report (experiments/reporting/selection_tables.py) compares the choice with the
defaults and with the best candidate on the test set (the oracle), and correlates proxy and test ranks.

An axis of the space whose keys the study or the dataset already sets (ELPV's ``coreset.ratio=0.05``) is
dropped from the space on that dataset (``~select.space.axes.<axis>`` on the select job): selection.py refuses
a base that sets a key the space varies, and the fixed value is the study's choice (the time budget), which the
candidates keep. The candidates are experiments/harness/selection.py's own ``candidates``, so the planner and
the select job enumerate the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from experiments.harness.overrides import override_key
from experiments.harness.selection_space import BASE as BASE_CANDIDATE  # the run's own configuration
from experiments.harness.selection_space import backbone_name, candidates
from experiments.harness.selection_space import backbone_options as listed

SPACES = Path(__file__).resolve().parents[2] / "conf" / "select" / "space"


@dataclass(frozen=True)
class Selection:
    """What a ``selection`` comparison runs on one dataset."""

    space: str                                      # a conf/select/space name
    overrides: tuple[str, ...] = ()                 # the select job's own (select.* settings)
    dropped: tuple[str, ...] = ()                   # the space's parts the dataset fixes, as Hydra deletions
    candidates: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, main.py overrides), the base first
    left_out: tuple[tuple[str, str], ...] = ()      # (candidate name, why): backbone options the study cannot run

    def arm(self, candidate: str) -> str:
        """The comparison's arm of a candidate: the base candidate is the baseline."""
        from experiments.studies.comparison import BASELINE

        return BASELINE if candidate == BASE_CANDIDATE else candidate

    def record(self) -> dict:
        return {"space": self.space, "overrides": list(self.overrides), "dropped": list(self.dropped),
                "candidates": {name: self.arm(name) for name, _ in self.candidates}}


def fix_space(space: dict, fixed: set[str], backbone: str) -> tuple[dict, list[str]]:
    """``space`` without the axes (and the per-backbone layers) whose keys are in ``fixed``, and the Hydra
    deletions that drop the same parts from the select job's space."""
    space, dropped = {**space, "axes": dict(space.get("axes") or {})}, []
    for axis, options in list(space["axes"].items()):
        if any(override_key(o) in fixed for option in options or [] for o in option):
            del space["axes"][axis]
            dropped.append(f"~select.space.axes.{axis}")
    layers = space.get("layers") or {}
    if "backbone.layers" in fixed and layers.get(backbone):
        space["layers"] = {name: options for name, options in layers.items() if name != backbone}
        dropped.append(f"~select.space.layers.{backbone}")
    return space, dropped


def backbone_options(space: dict, check, dataset: str) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """``space`` with only the ``backbones:`` options a study can run: a plain backbone whose weights are on this
    machine (the study's own check, ``check(name, dataset)``); a fine-tuned option is left out (its checkpoint
    path is the user's `make finetune` folder, not the study's: the study's own fine-tuned backbones are its
    ``methods`` comparisons). Returns the space, the select job's override that keeps the same options, and
    the options left out with why."""
    options = listed(space)
    if not options:
        return space, [], []
    kept, left = [], []
    for option in options:
        name = backbone_name(option)
        why = ("a fine-tuned checkpoint outside the study" if name == "finetuned" else check(name, dataset))
        (left.append((f"backbone:{' '.join(option)}", why)) if why else kept.append(list(option)))
    if not left:
        return space, [], []
    listed_text = ",".join("[" + ",".join(f"'{o}'" for o in option) + "]" for option in kept)
    override = f"select.space.backbones=[{listed_text}]" if kept else "~select.space.backbones"
    return {**space, "backbones": kept}, [override], left


def selection_of(name: str, spec: dict, source: str, backbone: str, fixed: set[str], check=None,
                 dataset: str = "") -> Selection:
    """The typed ``selection:`` of comparison ``name`` on a dataset whose runs set the keys ``fixed``;
    ``check(backbone, dataset)``: why a backbone option cannot run here (None: it can)."""
    where = f"{source}: comparisons.{name}.selection"
    if not isinstance(spec, dict) or set(spec) - {"space", "overrides"}:
        raise ValueError(f"{where}: {spec!r}: give {{space: <conf/select/space name>, overrides: [...]}}")
    space_name = str(spec.get("space", "default"))
    path = SPACES / f"{space_name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPACES.glob("*.yaml")))
        raise ValueError(f"{where}.space: {space_name!r}: no file {path} (known spaces: {known})")
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and override_key(o).startswith("select.")
                                                  for o in overrides):
        raise ValueError(f"{where}.overrides: {overrides!r}: give a list of select.* settings of the select job "
                         "(main.py settings belong in the study's common or the dataset's overrides)")
    space, dropped = fix_space(OmegaConf.to_container(OmegaConf.load(path), resolve=False), fixed, backbone)
    space, kept_backbones, left_out = backbone_options(space, check or (lambda *_: None), dataset)
    options = [tuple(o) for o in space.get("backbones") or []]
    layer_keys = {(): backbone, **{o: backbone_name(o) for o in options if o}}
    found = [c for c in candidates(space, layer_keys) if not (c.backbone and c.overrides == [f"backbone={backbone}"])]
    if len(found) < 2:
        raise ValueError(f"{where}: the space {space_name!r} leaves no candidate besides the base on this dataset "
                         f"(its axes set keys the study fixes: {', '.join(dropped) or 'none'})")
    return Selection(space_name, tuple([*overrides, *kept_backbones]), tuple(dropped), left_out=tuple(left_out),
                     candidates=
                     tuple((c.name, tuple(c.overrides)) for c in found))
