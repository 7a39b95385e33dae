"""A study and its comparisons, typed: conf/study/<name>.yaml is the only place a comparison is declared
(its arms, sweeps, titles, order), and everything else (the planner, the runner's manifest, the report's
sections, W&B grouping, the fine-tuning tables) reads it through ``Study`` and ``Comparison``.

A study runs on one or more datasets (``datasets:``: each with its categories, the overrides its runs add and,
optionally, the subset of the comparisons it runs). On each dataset, a comparison is that dataset's baseline
(the study's backbone with conf/ defaults and the dataset's overrides, shared by the dataset's comparisons) and
the arms measured against it. Its YAML names one *kind*; ``KINDS`` maps each kind to the function that turns
the YAML into arms, so a new kind of comparison is one function here plus its YAML:

- ``arms``: arm name -> overrides, or ``{overrides: [...], seeds: [...]}``;
- ``sweep`` + ``values`` (one arm per value; ``also`` adds settings that go with each value);
- ``extractors``: other backbones, only those whose pretrained weights are on this machine (the others
  are kept as skipped, with the reason);
- ``methods``: fine-tuned baseline backbones, a conf/method name each, or arm name ->
  ``{method, overrides}`` for fine-tuning settings (e.g. ``method.train.l2sp_weight``); with ``steps: [40, 200]``
  one arm per method and step count (``method.train.max_steps``), recorded as a sweep over it whose baseline is
  step 0 (the pretrained weights): the training-length curve;
- ``selection``: ``{space: <conf/select/space name>, overrides: [select.* settings]}``: the label-free choice of
  experiments/selection.py against the defaults and the test-set oracle (experiments/studies/selection_kind.py);
  its arms are the space's candidates, the ``base`` candidate being the baseline.

Any comparison may name its own ``seeds:`` (a subset of the study's, e.g. one seed for a costly curve); the
baseline keeps the study's seeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import OmegaConf

from experiments.harness.overrides import override_key, renamed_overrides
from experiments.studies.selection_kind import Selection, selection_of

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
    # a sweep whose values are not in the PatchCore runs' configs (fine-tuning steps): arm -> (series, value),
    # the baseline's value included; the report draws one curve per series through the baseline
    points: tuple[tuple[str, str, object], ...] = ()
    selection: Selection | None = None                # a ``selection`` comparison's space and candidates

    def record(self, dataset: str) -> dict:
        """What the manifest keeps of it on ``dataset`` (the report reads comparisons back from there)."""
        record = {"dataset": dataset, "comparison": self.name, "title": self.title, "kind": self.kind,
                  "sweep": self.sweep, "arms": [BASELINE, *(arm.name for arm in self.arms)]}
        if self.points:
            record["points"] = {arm: {"series": series, "value": value} for arm, series, value in self.points}
        if self.selection is not None:
            record["selection"] = self.selection.record()
        return record


@dataclass(frozen=True)
class StudyDataset:
    """One dataset of a study: its categories, what its runs add to the study's overrides, and the comparisons
    it runs (all of the study's unless its ``comparisons:`` names a subset; the baseline always runs)."""

    name: str                              # a conf/dataset name
    category: object                       # a name, a list or "all"
    comparisons: tuple[Comparison, ...]
    overrides: tuple[str, ...] = ()        # every PatchCore run on it (after the study's common)
    finetune_overrides: tuple[str, ...] = ()  # every fine-tuning run on it (after the study's)


DATASET_KEYS = ("category", "overrides", "finetune_overrides", "comparisons")
OLD_FORM = ("dataset", "category")  # the single-dataset form's keys, replaced by ``datasets:``


@dataclass(frozen=True)
class Study:
    name: str
    backbone: str                          # the baseline backbone (and the base of the fine-tuned ones)
    seeds: tuple[int, ...]
    datasets: tuple[StudyDataset, ...]
    save_model_seeds: frozenset[int] = frozenset()
    common: tuple[str, ...] = ()           # overrides of every PatchCore run (${study_dir}: the study folder,
                                           # ${dataset_dir}: the run's dataset's folder in it)
    finetune_overrides: tuple[str, ...] = ()
    logger: str = "none"
    source: str = "study config"
    config: dict = field(default_factory=dict, compare=False)  # the YAML as read (kept in the manifest)

    @classmethod
    def from_config(cls, config: dict, check: WeightsCheck) -> Study:
        source = config.get("source", "study config")
        old = [key for key in OLD_FORM if key in config]
        if old:
            raise StudyConfigError(
                f"{source}: the key(s) {', '.join(old)} are of the old single-dataset form: list the datasets under "
                "'datasets:' instead, e.g. datasets: {textures: {category: all}, elpv: {category: [mono, poly], "
                "overrides: [dataset.train_limit=200], comparisons: [finetuning]}} (docs/experiments.md, the study)")
        for key in ("name", "datasets", "backbone", "seeds", "comparisons"):
            if key not in config:
                raise StudyConfigError(f"{source}: the key {key!r} is missing")
        seeds = tuple(int(s) for s in config["seeds"])
        if not seeds:
            raise StudyConfigError(f"{source}: seeds is empty: give at least one seed")
        specs = config["comparisons"] or {}
        if not isinstance(config["datasets"], dict) or not config["datasets"]:
            raise StudyConfigError(f"{source}: datasets: give at least one dataset as <conf/dataset name>: "
                                   "{category: ..., overrides: [...], comparisons: [...]}")
        checked: dict[tuple[str, str], str | None] = {}  # each backbone's weights looked up once per dataset

        def cached(backbone: str, dataset: str) -> str | None:
            if (backbone, dataset) not in checked:
                checked[backbone, dataset] = check(backbone, dataset)
            return checked[backbone, dataset]

        common = tuple(map(str, config.get("common") or []))
        datasets = tuple(_dataset(str(name), entry, specs, source, str(config["backbone"]), cached, common)
                         for name, entry in config["datasets"].items())
        study = cls(str(config["name"]), str(config["backbone"]), seeds, datasets,
                    frozenset(int(s) for s in config.get("save_model_seeds") or []),
                    tuple(map(str, config.get("common") or [])),
                    tuple(map(str, config.get("finetune_overrides") or [])),
                    str(config.get("logger", "none")), source, config)
        study.check_names()
        return study

    def check_names(self) -> None:
        """Settings that changed name fail here, when the study is planned, not in its 40th job."""
        overrides = [*self.common, *self.finetune_overrides]
        for dataset in self.datasets:
            overrides += [*dataset.overrides, *dataset.finetune_overrides]
            for comparison in dataset.comparisons:
                for arm in comparison.arms:
                    overrides += [*arm.overrides, *(arm.finetune.overrides if arm.finetune else ())]
        messages = renamed_overrides(overrides)
        if messages:
            raise StudyConfigError(f"{self.source}: " + "; ".join(sorted(set(messages))))


def _dataset(name: str, entry, specs: dict, source: str, backbone: str, check: WeightsCheck,
             common: tuple[str, ...] = ()) -> StudyDataset:
    """One ``datasets:`` entry, its comparisons typed (the extractors' weights checked for it)."""
    where = f"{source}: datasets.{name}"
    entry = {} if entry is None else entry
    if not isinstance(entry, dict) or set(entry) - set(DATASET_KEYS):
        unknown = sorted(set(entry) - set(DATASET_KEYS)) if isinstance(entry, dict) else entry
        raise StudyConfigError(f"{where}: {unknown!r} not understood: give a mapping of {', '.join(DATASET_KEYS)}")
    names = entry.get("comparisons")
    if names is None:
        names = list(specs)
    elif not isinstance(names, list) or any(n not in specs for n in names):
        raise StudyConfigError(f"{where}.comparisons: {names!r}: give a list of the study's comparisons "
                               f"({', '.join(specs)}); leave it out to run them all")
    overrides = tuple(map(str, entry.get("overrides") or []))
    fixed = frozenset(override_key(o) for o in (*common, *overrides))
    context = _Context(source, backbone, name, check, fixed)
    return StudyDataset(name, entry.get("category", "all"),
                        tuple(_comparison(str(n), specs[n], context) for n in names), overrides,
                        tuple(map(str, entry.get("finetune_overrides") or [])))


@dataclass(frozen=True)
class _Context:
    source: str
    backbone: str
    dataset: str
    check: WeightsCheck
    fixed: frozenset[str] = frozenset()   # the keys the study's common and the dataset's overrides set


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


STEPS = "method.train.max_steps"  # the setting a ``methods`` comparison with ``steps:`` sweeps


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


def steps_of(name: str, spec: dict, source: str) -> list[int]:
    """The step counts of a ``methods`` comparison with ``steps:`` (positive integers, each once)."""
    steps = spec["steps"]
    if (not isinstance(steps, list) or not steps or len(set(steps)) != len(steps)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in steps)):
        raise StudyConfigError(f"{source}: comparisons.{name}.steps: {steps!r}: give distinct positive step counts, "
                               "e.g. [40, 200, 1000] (step 0, the pretrained weights, is the baseline)")
    return steps


# the fine-tuning length of conf/method/train/default.yaml: the planner treats a curve point of this length as
# the method's default run (shared with a ``methods`` comparison of the same study: run once)
DEFAULT_STEPS = OmegaConf.load(CONF_STUDY.parent / "method" / "train" / "default.yaml").max_steps
# a curve point longer than the default runs its whole length (the proxy still selects within the run): early
# stopping would cut every point whose first evaluations bring no gain back to about the default's length
WHOLE_LENGTH = "proxy.patience=null"


def _training_length(name: str, spec: dict, context: _Context) -> list[tuple[Arm, str, int]]:
    """(arm, its method arm's name, steps): each method arm once per step count, ``<arm> <steps> steps``,
    fine-tuned with method.train.max_steps=<steps>, without early stopping beyond the default length (at the
    default length with the default proxy.eval_every and patience, no evaluation but the last can stop it)."""
    found = []
    for arm in _methods(name, spec, context)[0]:
        for steps in steps_of(name, spec, context.source):
            length = (f"{STEPS}={steps}",) + ((WHOLE_LENGTH,) if steps > DEFAULT_STEPS else ())
            finetune = FineTune(arm.finetune.method, (*arm.finetune.overrides, *length))
            found.append((Arm(f"{arm.name} {steps} steps", finetune=finetune), arm.name, steps))
    return found


def _selection_of(name: str, spec: dict, context: _Context) -> Selection:
    try:
        return selection_of(name, spec["selection"], context.source, context.backbone, set(context.fixed),
                            context.check, context.dataset)
    except StudyConfigError:
        raise
    except ValueError as error:
        raise StudyConfigError(str(error)) from None


def _selection(name: str, spec: dict, context: _Context) -> tuple[list[Arm], list[tuple[str, str]]]:
    """One arm per candidate of the space but the base (the baseline itself); the backbone options the study
    cannot run are skipped arms, with why (as an extractor without weights is)."""
    selection = _selection_of(name, spec, context)
    return [Arm(candidate, overrides) for candidate, overrides in selection.candidates
            if selection.arm(candidate) != BASELINE], list(selection.left_out)


# kind (the key that names it in the YAML) -> (comparison name, its YAML, context) -> (arms, skipped arms)
KINDS: dict[str, Callable[[str, dict, _Context], tuple[list[Arm], list[tuple[str, str]]]]] = {
    "arms": _arms, "sweep": _sweep, "extractors": _extractors, "methods": _methods, "selection": _selection,
}


def _comparison(name: str, spec, context: _Context) -> Comparison:
    kinds = [kind for kind in KINDS if isinstance(spec, dict) and kind in spec]
    if len(kinds) != 1:
        raise StudyConfigError(f"{context.source}: comparisons.{name}: give one of {', '.join(KINDS)}")
    if "steps" in spec and kinds[0] != "methods":
        raise StudyConfigError(f"{context.source}: comparisons.{name}.steps: only a methods comparison takes steps")
    title = str(spec.get("title", name))
    if kinds[0] == "methods" and "steps" in spec:  # the training-length curve: a sweep of the fine-tuning steps
        found = _training_length(str(name), spec, context)
        points = ((BASELINE, BASELINE, 0), *((arm.name, series, steps) for arm, series, steps in found))
        arms, sweep, skipped = [arm for arm, _, _ in found], STEPS, []
    else:
        points = ()
        arms, skipped = KINDS[kinds[0]](str(name), spec, context)
        sweep = str(spec["sweep"]) if kinds[0] == "sweep" else None
    selection = _selection_of(str(name), spec, context) if kinds[0] == "selection" else None
    if "seeds" in spec:  # the comparison's own seeds (an arm's own seeds still win): a costly curve on fewer seeds
        seeds = spec["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in seeds):
            raise StudyConfigError(f"{context.source}: comparisons.{name}.seeds: {seeds!r}: give a list of seeds")
        arms = [arm if arm.seeds is not None else replace(arm, seeds=tuple(seeds)) for arm in arms]
    return Comparison(str(name), title, kinds[0], tuple(arms), sweep, tuple(skipped), points, selection)


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
