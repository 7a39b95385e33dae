"""ELPV: electroluminescence images of solar cells, real defects graded by experts (image labels, no masks).

The pip package ``elpv-dataset`` (Deitsch et al., CC BY-NC-SA 4.0 for the images) ships 2,624 grey
300x300 PNG cells and ``labels.csv``, one line per cell: ``images/cellNNNN.png <probability> <mono|poly>``,
the probability being the graders' agreement that the cell is defective: 0, 1/3, 2/3 or 1. The package
installs the PNG files themselves, so the samples point at them: nothing is decoded up front, copied or
cached, and nothing is downloaded.

Per category (the cell type): the nominal cells (probability 0) are split into train and test by a seeded
fraction (``split_seed``, a dataset setting, not the run's seed: every run and every seed of a study sees
the same test cells, so differences between arms are paired on the same images); the defective cells
(probability 1) are the test's defect type ``defective``; the cells the graders disagreed on (1/3, 2/3)
are test defect types of their own, ``uncertain_1_3`` and ``uncertain_2_3``, kept out of the main metrics
(``excluded_from_main_metrics``) and reported as their own AUROC against the nominal test cells.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.data.dataset import Sample
from core.data.images import DatasetError
from core.data.layouts import MVTecLayout

ELPV_CATEGORIES = ("mono", "poly")
ELPV_LICENSE = "CC BY-NC-SA 4.0"
# probability -> test defect type; 0 is nominal ("good")
ELPV_DEFECT_TYPES = {1.0: "defective", 1 / 3: "uncertain_1_3", 2 / 3: "uncertain_2_3"}
UNCERTAIN_TYPES = ("uncertain_1_3", "uncertain_2_3")
_PROBABILITIES = (0.0, *ELPV_DEFECT_TYPES)


@dataclass(frozen=True)
class Cell:
    path: Path
    probability: float  # exactly one of 0, 1/3, 2/3, 1
    category: str  # mono | poly


def package_root() -> Path:
    """The ``data`` folder of the installed ``elpv-dataset`` package (labels.csv and images/)."""
    spec = importlib.util.find_spec("elpv_dataset")  # found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("dataset=elpv needs the elpv-dataset package, which `make install` installs: run "
                           "`make install` (or `pip install elpv-dataset`), or set dataset.root to a folder "
                           "holding its labels.csv and images/")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_labels(labels: Path) -> list[Cell]:
    """The cells listed in ``labels.csv`` (paths relative to its folder), in file order."""
    if not labels.is_file():
        raise DatasetError(f"ELPV labels file {labels} does not exist: dataset.root must be the folder holding "
                           "labels.csv and images/ (null: the installed elpv-dataset package's)")
    cells = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            path, probability, category = fields
            probability = float(probability)
        except ValueError:
            raise DatasetError(f"{labels}, line {number}: {line!r} is not '<image path> <probability> <mono|poly>'"
                               ) from None
        known = next((p for p in _PROBABILITIES if abs(probability - p) < 1e-3), None)
        if known is None or category not in ELPV_CATEGORIES:
            raise DatasetError(f"{labels}, line {number}: probability {probability} / type {category!r}: expected "
                               f"a probability of 0, 1/3, 2/3 or 1 and a type in {ELPV_CATEGORIES}")
        cells.append(Cell(labels.parent / path, known, category))
    if not cells:
        raise DatasetError(f"ELPV labels file {labels} lists no cells")
    return cells


def split_nominal(paths: list[Path], test_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, test): a seeded ``test_fraction`` of ``paths`` for the test, each side in the given order."""
    count = round(test_fraction * len(paths))
    if not 1 <= count < len(paths):
        raise DatasetError(f"dataset.test_fraction={test_fraction} puts {count} of {len(paths)} nominal cells in "
                           "the test set: both train and test need at least one; choose a value in (0, 1)")
    held = set(np.random.default_rng(seed).permutation(len(paths))[:count].tolist())
    return ([p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held])


class ElpvLayout(MVTecLayout):
    """ELPV's cells by type (``mono``, ``poly``): a seeded train/test split of the nominal cells, the defective
    and uncertain cells in the test set, no masks (image metrics only)."""

    excluded_from_main_metrics = UNCERTAIN_TYPES

    def __init__(
        self,
        name: str = "elpv",
        root: str | Path | None = None,
        categories: Sequence[str] | None = None,
        resize: int = 224,
        image_size: int = 224,
        train_limit: int | None = None,
        test_fraction: float = 0.3,
        split_seed: int = 0,
        skip_unreadable: bool = False,
    ):
        categories = list(ELPV_CATEGORIES) if categories is None else [str(c) for c in categories]
        unknown = [c for c in categories if c not in ELPV_CATEGORIES]
        if unknown:
            raise DatasetError(f"unknown elpv categories {unknown} in dataset.categories: choose from "
                               f"{list(ELPV_CATEGORIES)} (the cell types)")
        if not 0 < test_fraction < 1:
            raise DatasetError(f"dataset.test_fraction={test_fraction} must be in (0, 1): the share of the nominal "
                               "cells held out for the test set")
        super().__init__(name, package_root() if root is None else root, categories, "good", resize, image_size,
                         train_limit, skip_unreadable)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self._cells: list[Cell] | None = None

    def cells(self, category: str) -> list[Cell]:
        """The category's cells sorted by path, less any the start-up scan skipped."""
        if self._cells is None:
            self._cells = read_labels(self.root / "labels.csv")
        return sorted((c for c in self._cells if c.category == category and c.path not in self._skipped),
                      key=lambda c: c.path)

    def nominal_split(self, category: str) -> tuple[list[Path], list[Path]]:
        """(train, test) paths of the category's probability-0 cells under ``split_seed``."""
        nominal = [c.path for c in self.cells(category) if c.probability == 0.0]
        return split_nominal(nominal, self.test_fraction, self.split_seed)

    def train_samples(self, category: str, seed: int = 0) -> list[Sample]:
        """The nominal training cells; a subset of ``train_limit`` of them drawn with the run's ``seed`` if set."""
        train, _ = self.nominal_split(category)
        return [Sample(p, 0, "good", None) for p in self.limited(train, seed)]

    def test_samples(self, category: str) -> list[Sample]:
        """The nominal test cells ("good"), then each defect type's cells: ``defective`` (probability 1),
        ``uncertain_1_3``, ``uncertain_2_3`` (the last two out of the main metrics); none has a mask."""
        _, nominal = self.nominal_split(category)
        samples = [Sample(p, 0, "good", None) for p in nominal]
        cells = self.cells(category)
        for probability, defect_type in ELPV_DEFECT_TYPES.items():
            samples += [Sample(c.path, 1, defect_type, None) for c in cells if c.probability == probability]
        return samples
