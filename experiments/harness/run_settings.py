"""The run's own settings (the top-level keys of conf/config.yaml that no component takes), typed and
checked in one place; every other setting is checked by the class it is given to (experiments/harness/
components.py). ``validate`` is the start-up pass: it reports every bad setting at once, by name."""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.harness.components import fits, type_problems, value_problems

SAVE_MODEL = (True, False, "spec_only")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    seed: int = 0
    device: str = "auto"
    batch_size: int = 8
    num_workers: int = 2
    save_model: bool | str = False
    progress: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")
        if self.save_model not in SAVE_MODEL:
            raise ValueError(f"save_model={self.save_model!r}: choose true (the model with its extractor's weights), "
                             "spec_only (without them: they are looked up again on load) or false")

    @classmethod
    def problems(cls, cfg: DictConfig) -> list[str]:
        """The mistyped ones among these keys of ``cfg`` (and ``viz.n``)."""
        values = {field.name: cfg.get(field.name, field.default) for field in dataclasses.fields(cls)}
        found = value_problems(values, typing.get_type_hints(cls))
        viz = OmegaConf.select(cfg, "viz.n", default=0)
        if viz is not None and not (fits(viz, int) and viz >= 0):
            found.append(f"viz.n={viz} must be an integer >= 0")
        return found

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunSettings:
        return cls(**{f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(cls)})


def validate(cfg: DictConfig) -> RunSettings:
    """Every mistyped setting of the run at once (one ``ValueError`` listing them), then the run's own ranges.
    The components' ranges are checked when the harness builds them, before any image is read."""
    found = RunSettings.problems(cfg) + type_problems(cfg)
    if found:
        raise ValueError("bad settings, nothing was run:\n  " + "\n  ".join(found))
    return RunSettings.from_config(cfg)


def check_writable(folder: Path, what: str) -> None:
    """Whether ``folder`` can be made and written, checked now (a probe file in its nearest existing
    ancestor, nothing left behind), so an unwritable output fails before the fit, not after it."""
    existing = folder.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} cannot be written: {existing} is a file, not a folder; choose another")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"{what} {folder} cannot be written ({error.strerror or error}): choose a writable "
                         "folder") from None
