"""A regular (non-editable) install carries conf/: the entry points find their configs from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps --target`` of the project: the files a wheel install puts in site-packages."""
    site, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("source") / "suite"
    # built from a copy: setuptools writes build/ and *.egg-info into the source folder
    skipped = {".venv", ".git", "outputs", "multirun", "data", "wandb", "checkpoints", "build"}

    def generated(folder: str, names: list[str]) -> set[str]:  # top-level generated folders, caches anywhere
        return {n for n in names if n == "__pycache__" or (Path(folder) == REPO and n in skipped)}

    shutil.copytree(REPO, source, ignore=generated)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return site


def run_installed(site: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_installed_copy_ships_the_configs(installed, tmp_path) -> None:
    assert (installed / "conf" / "config.yaml").is_file()
    assert (installed / "conf" / "model" / "patchcore.yaml").is_file()
    code = "import experiments.main, core.data, conf; print(experiments.main.__file__); print(core.data.__file__)"
    done = run_installed(installed, tmp_path, code)
    assert done.returncode == 0, done.stderr
    for path in done.stdout.split():
        assert path.startswith(str(installed)), path  # the installed copy, not this checkout


@pytest.mark.parametrize(("entry", "key"), [("main", "dataset:"), ("predict", "model_dir:"), ("finetune", "method:")])
def test_console_entry_points_compose_their_config(installed, tmp_path, entry, key) -> None:
    """What `patchcore-fit --cfg job search=faiss` runs: the module's main, configs found as pkg://conf."""
    code = (f"import sys; sys.argv = ['patchcore', '--cfg', 'job', 'device=cpu']; "
            f"from experiments.{entry} import main; main()")
    done = run_installed(installed, tmp_path, code)
    assert done.returncode == 0, done.stderr
    assert "device: cpu" in done.stdout and key in done.stdout
