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
    # (the generated top-level folders of .gitignore: a study's folder alone can hold tens of GB)
    skipped = {".venv", ".git", "outputs", "multirun", "data", "wandb", "checkpoints", "build", "studies",
               ".pytest_cache", ".ruff_cache", "feature_cache", ".cache"}

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


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_console_scripts(tmp_path) -> None:
    """A built wheel, installed into a new virtual environment, gives working console scripts from any folder.

    The dependencies (torch and the rest, GBs) are borrowed from this environment through a plain path
    entry (not a site dir: this checkout's editable install is not picked up), the project itself comes
    from the wheel only."""
    import sysconfig
    import venv

    source = tmp_path / "source"
    top_level = {".venv", ".git", "outputs", "multirun", "data", "wandb", "checkpoints", "build", "studies"}
    shutil.copytree(REPO, source, ignore=lambda folder, names: {  # generated folders (top level), caches anywhere
        n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (Path(folder) == REPO and n in top_level)})
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "wheels"), str(source)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheels").glob("patchcore_suite-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                                "--no-deps", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    located = subprocess.run([str(python), "-c", "import experiments.main as m, conf; print(m.__file__)"], cwd=work,
                             capture_output=True, text=True, timeout=300)
    assert located.returncode == 0 and located.stdout.strip().startswith(str(site)), located.stdout + located.stderr
    for script, key in (("patchcore-fit", "dataset:"), ("patchcore-predict", "model_dir:"),
                        ("patchcore-export", "format:")):
        done = subprocess.run([str(env_dir / "bin" / script), "--cfg", "job"], cwd=work, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{script}: {done.stderr[-2000:]}"
        assert key in done.stdout, script
    helped = subprocess.run([str(env_dir / "bin" / "patchcore-fit"), "--help"], cwd=work, capture_output=True,
                            text=True, timeout=300)
    assert helped.returncode == 0 and "backbone:" in helped.stdout, helped.stderr[-2000:]
