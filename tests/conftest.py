"""Shared fixtures: the embedded textures set (generated once per session) and Hydra-composed configs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from core.data import ensure_textures

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(autouse=True)
def _no_leaked_log_files():
    """An entry point called in-process (a Hydra main stopped by Ctrl-C) leaves Hydra's FileHandler to its run
    folder on the root logger; pytest removes a passing test's tmp_path, and every later log line would then fail
    on the missing file. Close and remove file handlers a test added (a real process ends with its run)."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h not in before]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def textures_root(tmp_path_factory) -> Path:
    return ensure_textures(tmp_path_factory.mktemp("textures") / "textures")


@pytest.fixture
def make_config() -> Callable[..., DictConfig]:
    """Compose conf/config.yaml with overrides, as `python experiments/main.py <overrides>` would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=["num_workers=0", "progress=false", *overrides])

    return _compose


def write_tiny_category(root: Path, category: str, n_train: int = 3, n_good: int = 2, n_bad: int = 2,
                        masks: bool = True, size: int = 64) -> Path:
    """A small MVTec-layout category: smooth noise images, defects are bright squares with masks."""
    rng = np.random.default_rng(abs(hash(category)) % 2**32)
    base = root / category

    def noise() -> np.ndarray:
        return (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)

    for split, count in (("train/good", n_train), ("test/good", n_good)):
        (base / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(noise()).save(base / split / f"{i:03d}.png")
    (base / "test" / "spot").mkdir(parents=True, exist_ok=True)
    for i in range(n_bad):
        image, mask = noise(), np.zeros((size, size), np.uint8)
        y, x = 20 + 4 * i, 24
        image[y : y + 12, x : x + 12] = 255
        mask[y : y + 12, x : x + 12] = 255
        Image.fromarray(image).save(base / "test" / "spot" / f"{i:03d}.png")
        if masks:
            (base / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(base / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return base


def interrupt_at_call(objective, call: int = 2) -> None:
    """Make ``objective.loss`` raise KeyboardInterrupt at its ``call``-th call (a Ctrl-C inside that training
    step), for the resume tests; the calls before it run the real loss."""
    real_loss, calls = objective.loss, {"n": 0}

    def loss(images):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real_loss(images)

    objective.loss = loss


def for_model(shared: tuple[str, ...], *extra: str) -> tuple[str, ...]:
    """``shared`` test overrides plus ``extra``, without the PatchCore settings when ``extra`` picks the CAE
    (a model=cae run has no patchcore node, as on the command line)."""
    if "model=cae" in extra:
        shared = tuple(o for o in shared if not o.startswith("patchcore."))
    return (*shared, *extra)
