"""tests/gpu/gpu_check.sh on a machine without a GPU: one line saying so, exit 2, nothing installed or written
(GPU time is scarce, so the script is checked here before it ever runs on one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "gpu" / "gpu_check.sh"


def without_nvidia_smi(path: str, shims: Path) -> str:
    """PATH with no nvidia-smi on it: a folder that holds one (e.g. /usr/bin on a GPU machine) is replaced by
    ``shims``, links to everything else in it; this interpreter's folder first (its torch answers)."""
    shims.mkdir()
    folders = []
    for folder in filter(None, path.split(os.pathsep)):
        if not (Path(folder) / "nvidia-smi").exists():
            folders.append(folder)
            continue
        for entry in Path(folder).iterdir():
            if entry.name != "nvidia-smi" and not (shims / entry.name).exists():
                (shims / entry.name).symlink_to(entry)
        folders.append(str(shims))
    return os.pathsep.join([str(Path(sys.executable).parent), *folders])


def test_no_gpu_is_reported_in_one_line_with_exit_2(tmp_path) -> None:
    out = tmp_path / "out"
    path = without_nvidia_smi(os.environ.get("PATH", ""), tmp_path / "bin")
    env = {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "", "OUT": str(out)}
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU on this machine"), result.stdout
    assert "torch.cuda.is_available() is False" in lines[0]
    assert time.monotonic() - started < 60  # at once: only torch's import
    assert not out.exists()  # no output folder, no install


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
