"""A study and its comparisons, typed: conf/study/<name>.yaml is the only place a comparison is declared
(its arms, sweeps, titles, order), and everything else (the planner, the runner's manifest, the report's
sections, W&B grouping, the fine-tuning tables) reads it through ``Study`` and ``Comparison``.

A comparison is a baseline (the study's backbone with conf/ defaults, shared by every comparison) and the
arms measured against it. Its YAML names one *kind*; ``KINDS`` maps each kind to the function that turns
the YAML into arms, so a new kind of comparison is one function here plus its YAML:

- ``arms``: arm name -> overrides, or ``{overrides: [...], seeds: [...]}``;
- ``sweep`` + ``values`` (one arm per value; ``also`` adds settings that go with each value);
- ``extractors``: other backbones, only those whose pretrained weights are on this machine (the others
  are kept as skipped, with the reason);
- ``methods``: fine-tuned baseline backbones, a conf/method name each, or arm name ->
  ``{method, overrides}`` for fine-tuning settings (e.g. ``method.train.l2sp_weight``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from experiments.harness.overrides import renamed_overrides

CONF_STUDY = Path(__file__).resolve().parents[2] / "conf" / "study"
BASELINE = "baseline"
WeightsCheck = Callable[[str, str], "str | None"]  # (backbone, dataset) -> why it cannot run here, or None


class StudyConfigError(ValueError):
    """A study config that cannot be planned; the message names the file and the setting."""


@dataclass(frozen=True)
class FineTune:
    """The fine-tuning run an arm's backbone comes from: a conf/method name and its overrides."""

    method: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()        # experiments/main.py overrides (besides the study's)
    seeds: tuple[int, ...] | None = None   # None: the study's seeds
    finetune: FineTune | None = None


@dataclass(frozen=True)
class Comparison:
    name: str
    title: str
    kind: str                                         # a key of KINDS
    arms: tuple[Arm, ...]                             # without the baseline
    sweep: str | None = None                          # the swept setting of a sweep
    skipped: tuple[tuple[str, str], ...] = ()         # (arm, why it cannot run here)

    def record(self) -> dict:
        """What the manifest keeps of it (the report reads comparisons back from there)."""
        return {"title": self.title, "kind": self.kind, "sweep": self.sweep,
                "arms": [BASELINE, *(arm.name for arm in self.arms)]}


@dataclass(frozen=True)
class Study:
    name: str
    dataset: str
    category: object                       # a name, a list or "all"
    backbone: str                          # the baseline backbone (and the base of the fine-tuned ones)
    seeds: tuple[int, ...]
    comparisons: tuple[Comparison, ...]
    save_model_seeds: frozenset[int] = frozenset()
    common: tuple[str, ...] = ()           # overrides of every PatchCore run (${study_dir}: the study folder)
    finetune_overrides: tuple[str, ...] = ()
    logger: str = "none"
    source: str = "study config"
    config: dict = field(default_factory=dict, compare=False)  # the YAML as read (kept in the manifest)

    @classmethod
    def from_config(cls, config: dict, check: WeightsCheck) -> Study:
        source = config.get("source", "study config")
        for key in ("name", "dataset", "backbone", "seeds", "comparisons"):
            if key not in config:
                raise StudyConfigError(f"{source}: the key {key!r} is missing")
        seeds = tuple(int(s) for s in config["seeds"])
        if not seeds:
            raise StudyConfigError(f"{source}: seeds is empty: give at least one seed")
        context = _Context(source, str(config["backbone"]), str(config["dataset"]), check)
        comparisons = tuple(_comparison(name, spec, context) for name, spec in (config["comparisons"] or {}).items())
        study = cls(str(config["name"]), context.dataset, config.get("category", "all"), context.backbone, seeds,
                    comparisons, frozenset(int(s) for s in config.get("save_model_seeds") or []),
                    tuple(map(str, config.get("common") or [])),
                    tuple(map(str, config.get("finetune_overrides") or [])),
                    str(config.get("logger", "none")), source, config)
        study.check_names()
        return study

    def check_names(self) -> None:
        """Settings that changed name fail here, when the study is planned, not in its 40th job."""
        overrides = [*self.common, *self.finetune_overrides]
        for comparison in self.comparisons:
            for arm in comparison.arms:
                overrides += [*arm.overrides, *(arm.finetune.overrides if arm.finetune else ())]
        messages = renamed_overrides(overrides)
        if messages:
            raise StudyConfigError(f"{self.source}: " + "; ".join(sorted(set(messages))))


@dataclass(frozen=True)
class _Context:
    source: str
    backbone: str
    dataset: str
    check: WeightsCheck


def slug(text: str) -> str:
    """A name as a folder name."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(text)).strip("_") or "x"


def value_text(value) -> str:
    """A value as a Hydra override writes it."""
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def _arms(name: str, spec: dict, context: _Context) -> tuple[list[Arm], list[tuple[str, str]]]:
    arms = []
    for arm, arm_spec in spec["arms"].items():
        if isinstance(arm_spec, list):
            arms.append(Arm(str(arm), tuple(map(str, arm_spec))))
        elif isinstance(arm_spec, dict) and "overrides" in arm_spec:
            seeds = arm_spec.get("seeds")
            arms.append(Arm(str(arm), tuple(map(str, arm_spec["overrides"])),
                            tuple(int(s) for s in seeds) if seeds is not None else None))
        else:
            raise StudyConfigError(f"{context.source}: comparisons.{name}.arms.{arm}: give a list of overrides or "
                                   "{overrides: [...], seeds: [...]}")
    return arms, []


def _sweep(name: str, spec: dict, context: _Context) -> tuple[list[Arm], list[tuple[str, str]]]:
    key, values, also = str(spec["sweep"]), list(spec.get("values") or []), spec.get("also") or {}
    for other, linked in also.items():
        if len(linked) != len(values):
            raise StudyConfigError(f"{context.source}: comparisons.{name}.also.{other}: give one value per sweep "
                                   f"value ({len(values)})")
    return [Arm(f"{key.rsplit('.', 1)[-1]}={value_text(value)}",
                (f"{key}={value_text(value)}", *(f"{o}={value_text(v[i])}" for o, v in also.items())))
            for i, value in enumerate(values)], []


def _extractors(name: str, spec: dict, context: _Context) -> tuple[list[Arm], list[tuple[str, str]]]:
    arms, skipped = [], []
    for extractor in map(str, spec["extractors"]):
        if extractor == context.backbone:
            continue
        reason = context.check(extractor, context.dataset)
        if reason:
            skipped.append((extractor, reason))
        else:
            arms.append(Arm(extractor, (f"backbone={extractor}",)))
    return arms, skipped


def _methods(name: str, spec: dict, context: _Context) -> tuple[list[Arm], list[tuple[str, str]]]:
    methods = spec["methods"]
    entries = ([(str(m), {"method": str(m)}) for m in methods] if isinstance(methods, list)
               else list(methods.items()))
    arms = []
    for arm, method_spec in entries:
        if not isinstance(method_spec, dict) or "method" not in method_spec:
            raise StudyConfigError(f"{context.source}: comparisons.{name}.methods.{arm}: give "
                                   "{method: <conf/method name>, overrides: [...]}")
        finetune = FineTune(str(method_spec["method"]), tuple(map(str, method_spec.get("overrides") or [])))
        arms.append(Arm(str(arm), finetune=finetune))
    return arms, []


# kind (the key that names it in the YAML) -> (comparison name, its YAML, context) -> (arms, skipped arms)
KINDS: dict[str, Callable[[str, dict, _Context], tuple[list[Arm], list[tuple[str, str]]]]] = {
    "arms": _arms, "sweep": _sweep, "extractors": _extractors, "methods": _methods,
}


def _comparison(name: str, spec, context: _Context) -> Comparison:
    kinds = [kind for kind in KINDS if isinstance(spec, dict) and kind in spec]
    if len(kinds) != 1:
        raise StudyConfigError(f"{context.source}: comparisons.{name}: give one of {', '.join(KINDS)}")
    arms, skipped = KINDS[kinds[0]](str(name), spec, context)
    return Comparison(str(name), str(spec.get("title", name)), kinds[0], tuple(arms),
                      str(spec["sweep"]) if kinds[0] == "sweep" else None, tuple(skipped))


def load_study(name_or_path: str) -> dict:
    """conf/study/<name>.yaml (or a path to a YAML file) as a plain dict (``Study.from_config`` types it)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_STUDY / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONF_STUDY.glob("*.yaml")))
        raise StudyConfigError(f"study {name_or_path!r}: no file {path} (known studies: {known})")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    config["source"] = str(path)
    return config
