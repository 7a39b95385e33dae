"""Issue 26, runs under hostile conditions: a full disk mid-run, a refused run folder, two fine-tunes of one
checkpoint, a study runner killed with -9, temporaries of killed saves, a study started from another folder.
Each test asserts what must hold afterwards (files byte-identical, processes gone, results where they belong)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF_DIR, for_model, write_tiny_category

REPO = Path(__file__).resolve().parents[1]
TINY = ("dataset=folder", "dataset.resize=32", "dataset.image_size=32", "backbone=resnet18",
        "backbone.pretrained=false", "backbone.layers=[layer2]", "patchcore.embedder.embed_dim=16",
        "coreset.ratio=0.5", "logger=none", "viz.n=0", "num_workers=0", "progress=false")


def _tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones included) -> its SHA-256."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# --------------------------------------------------------------------------- 6: a full disk keeps finished work


@pytest.mark.parametrize("failing", ["scores.csv", "model"])
def test_a_full_disk_keeps_every_finished_category(tmp_path, make_config, monkeypatch, failing) -> None:
    """ENOSPC at beta's first write of its outputs (its scores.csv rows, or its saved model's files): alpha's
    results stay on disk, results.json is written and records beta as failed with the error."""
    import core.io
    import core.model_files
    from experiments.harness.fit_and_evaluate import run

    for name in ("alpha", "beta"):
        write_tiny_category(tmp_path / "data", name, size=32)
    real = core.io.atomic_write
    writes: list[str] = []
    failed: list[str] = []

    def disk_full_at_beta(path, write):  # the disk is full for one write: the Nth, beta's first output
        path = Path(path)
        writes.append(str(path.relative_to(tmp_path / "run")))
        hits = [w for w in writes if (w == "scores.csv" if failing == "scores.csv" else "beta" in w)]
        if not failed and len(hits) == (2 if failing == "scores.csv" else 1):
            failed.append(writes[-1])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(core.io, "atomic_write", disk_full_at_beta)
    monkeypatch.setattr(core.model_files, "atomic_write", disk_full_at_beta)
    cfg = make_config(*for_model(TINY, f"dataset.root={tmp_path / 'data'}", "category=all", "save_model=true"))
    results = run(cfg, tmp_path / "run")
    assert len(failed) == 1 and (failed[0] == "scores.csv" if failing == "scores.csv" else "beta" in failed[0])

    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk["categories"]) == ["alpha"] and on_disk["complete"] is False
    assert on_disk["failed"]["beta"].startswith("OSError: [Errno 28] No space left on device")
    assert on_disk["mean"]["image_auroc"] == on_disk["categories"]["alpha"]["image_auroc"]
    rows = (tmp_path / "run" / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("category,") and len(rows) == 1 + 4 and all(r.startswith("alpha,") for r in rows[1:])
    assert (tmp_path / "run" / "models" / "alpha" / "manifest.json").is_file()
    if failing == "model":
        assert not (tmp_path / "run" / "models" / "beta").exists()  # a save that failed leaves no folder behind
    assert not [p.name for p in (tmp_path / "run").rglob(".*") if p.name.endswith((".tmp", ".old"))]


# --------------------------------------------------------------------------- 6: a refused run touches nothing


def _taken_folder(folder: Path, config_hash: str, complete: bool = True) -> None:
    """A run folder as a finished run of the config ``config_hash`` leaves it (results, log, .hydra/)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 7\ncoreset:\n  ratio: 0.01\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- coreset.ratio=0.01\n- seed=7\n")
    (folder / ".hydra" / "hydra.yaml").write_text("hydra:\n  run:\n    dir: elsewhere\n")
    (folder / "main.log").write_text("[2024-01-01 00:00:00,000][patchcore][INFO] - fitted\n")
    (folder / "scores.csv").write_text("category,path,defect_type,label,image_score\nwidget,a.png,good,0,1.5\n")
    (folder / "results.json").write_text(json.dumps({"config_hash": config_hash, "complete": complete,
                                                     "categories": {}, "failed": {}}))


def test_a_refused_run_leaves_its_folder_untouched(tmp_path) -> None:
    """Another config's finished run in hydra.run.dir: main.py refuses it in one line, and every file there,
    .hydra/ and the log included, is byte-identical afterwards (Hydra used to overwrite .hydra/ first)."""
    folder = tmp_path / "run"
    _taken_folder(folder, "0123456789abcdef")
    before = _tree(folder)
    command = [sys.executable, str(REPO / "experiments" / "main.py"), *TINY, f"dataset.root={tmp_path / 'data'}",
               "category=widget", f"hydra.run.dir={folder}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    assert f"error: {folder} already holds the complete results of another config (hash 0123456789abcdef" \
        in done.stderr and "set hydra.run.dir to a new folder" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert _tree(folder) == before


def test_the_same_config_is_not_refused_before_hydra_starts(tmp_path, make_config) -> None:
    """The start-up check hashes the config as the task will: the folder of a finished run of the *same* config
    passes it, and the run is then skipped as done (not refused)."""
    from experiments.harness.run_key import config_hash

    overrides = [*TINY, f"dataset.root={tmp_path / 'data'}", "category=widget"]
    folder = tmp_path / "run"
    _taken_folder(folder, config_hash(make_config(*overrides)))
    command = [sys.executable, str(REPO / "experiments" / "main.py"), *overrides, f"hydra.run.dir={folder}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped: this config" in done.stderr + done.stdout and "already done in" in done.stderr + done.stdout


def test_the_start_up_check_refuses_before_the_folder_is_written(tmp_path) -> None:
    """The callback itself, on the composed config (with its hydra node) as Hydra hands it over."""
    from experiments.harness.startup import RefuseTakenRunFolder

    folder = tmp_path / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"hydra.run.dir={folder}"], return_hydra_config=True)
    RefuseTakenRunFolder().on_run_start(cfg)  # no folder yet: nothing to check
    _taken_folder(folder, "fedcba9876543210", complete=False)
    with pytest.raises(SystemExit, match=r"already holds the partial results of another config \(hash fedcba"):
        RefuseTakenRunFolder().on_run_start(cfg)


# --------------------------------------------------------------------------- 7: one writer per checkpoint

HOLD = textwrap.dedent("""
    import sys, time
    from extensions.checkpoint import CheckpointFiles, hold_checkpoint
    with hold_checkpoint(CheckpointFiles.for_run(sys.argv[1], "rotation", "resnet18", "widget")):
        print("held", flush=True)
        time.sleep(120)
""")


def _holder(root: Path) -> subprocess.Popen:
    """A real process that holds the checkpoint lock of rotation/resnet18/widget under ``root``."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_checkpoint_has_one_writer(tmp_path) -> None:
    from extensions.checkpoint import CheckpointBusyError, CheckpointFiles, hold_checkpoint

    files = CheckpointFiles.for_run(tmp_path, "rotation", "resnet18", "widget")
    with hold_checkpoint(files) as lock:
        assert lock == tmp_path / "rotation" / "resnet18" / "widget.lock"
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(CheckpointBusyError, match=rf"widget.pt is being fine-tuned by process {os.getpid()} .*"
                                                      rf"holds {lock}"):
            with hold_checkpoint(files):
                pass
        with hold_checkpoint(CheckpointFiles.for_run(tmp_path, "rotation", "resnet18", "other")):
            pass  # another category: its own lock
    with hold_checkpoint(files):  # released at the end of the block
        pass

    holder = _holder(tmp_path)
    try:
        with pytest.raises(CheckpointBusyError, match=rf"by process {holder.pid} "):
            with hold_checkpoint(files):
                pass
    finally:
        holder.kill()
        holder.wait()
    with hold_checkpoint(files):  # the lock of a process killed with -9 does not block
        assert json.loads(files.lock.read_text())["pid"] == os.getpid()


def test_a_second_fine_tune_of_the_same_checkpoint_is_refused_at_once(tmp_path) -> None:
    """The real CLI, while another process holds the checkpoint: one line naming that process, in seconds, no
    training (no checkpoint, no loss log)."""
    write_tiny_category(tmp_path / "data", "widget", n_train=3, size=32)
    holder = _holder(tmp_path / "ckpt")
    try:
        command = [sys.executable, "experiments/finetune.py", "backbone=resnet18", "backbone.pretrained=false",
                   "dataset=folder", f"dataset.root={tmp_path / 'data'}", "category=widget", "method=rotation",
                   "method.train.max_steps=2", "num_workers=0", "progress=false", "logger=none",
                   f"checkpoint_dir={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'out'}"]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    lock = tmp_path / "ckpt" / "rotation" / "resnet18" / "widget.lock"
    assert f"is being fine-tuned by process {holder.pid} " in done.stderr and str(lock) in done.stderr
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in lock.parent.iterdir()) == ["widget.lock"]


# --------------------------------------------------------------------------- 7: temporaries of killed saves

KILLED_SAVE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from core.model_files import write_sealed_folder

    def write(tmp):
        (tmp / "bank.safetensors").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), 9)  # killed mid-save

    write_sealed_folder(Path(sys.argv[1]), write)
""")


def test_temporary_folders_of_killed_saves_are_removed_by_the_next_run(tmp_path, make_config) -> None:
    from core.io import remove_dead_temporaries

    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    killed = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(models / "brick")],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.wait(timeout=60) == -signal.SIGKILL
    [left] = list(models.iterdir())  # the writer's PID is in the name: .brick.<pid>.<random>.tmp
    assert left.name.startswith(f".brick.{killed.pid}.") and left.name.endswith(".tmp") and left.is_dir()
    dead = _dead_pid()
    old = models / f".grass.{dead}.k3x.old"  # a folder being replaced when its writer died
    old.mkdir()
    (old / "model.json").write_text("{}")
    live = models / f".grass.{os.getpid()}.abc_12.tmp"  # this process is alive: its save is still running
    live.mkdir()
    (live / "bank.safetensors").write_bytes(b"y")
    inside_live = live / f".bank.safetensors.{os.getpid()}.x1.tmp"
    inside_live.write_bytes(b"z")

    assert remove_dead_temporaries(models, prefix=".brick.", recursive=False) == [left]  # another name: kept
    assert not left.exists() and old.is_dir()
    assert remove_dead_temporaries(tmp_path / "run") == [old]  # what a run of main.py into the folder does
    assert live.is_dir() and inside_live.is_file() and sorted(p.name for p in models.iterdir()) == [live.name]


def test_sealed_folders_carry_the_writers_pid(tmp_path) -> None:
    from core.model_files import write_sealed_folder

    seen: list[str] = []
    write_sealed_folder(tmp_path / "E6", lambda tmp: (seen.append(tmp.name), (tmp / "f").write_text("1")))
    assert seen[0].startswith(f".E6.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E6"]


# --------------------------------------------------------------------------- 7: no orphan jobs

SLEEPER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    Path(sys.argv[1]).write_text(str(os.getpid()))
    time.sleep(120)
""")
RUNNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import experiments.studies.runner as runner
    runner.PACKAGE_ROOT = Path(sys.argv[1])
    runner.subprocess_runner([sys.executable, "experiments/sleeper.py", sys.argv[2]], Path(sys.argv[3]))
""")


def test_a_study_runner_killed_with_sigkill_leaves_no_job_running(tmp_path) -> None:
    (tmp_path / "pkg" / "experiments").mkdir(parents=True)
    (tmp_path / "pkg" / "experiments" / "sleeper.py").write_text(SLEEPER)
    pid_file = tmp_path / "job.pid"
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "pkg"), str(pid_file),
                               str(tmp_path / "job" / "study.log")], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert _wait_for(lambda: pid_file.is_file() and pid_file.read_text().strip(), 30)
        job = int(pid_file.read_text())
        assert _running(job)
        runner.kill()  # SIGKILL: no handler, no cleanup in the runner
        runner.wait()
        assert _wait_for(lambda: not _running(job), 3), f"job {job} outlived its runner"
    finally:
        runner.kill()
        if pid_file.is_file() and _running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


# --------------------------------------------------------------------------- 8: a study runs from any folder

FAKE_MAIN = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    folder = Path(next(a for a in sys.argv if a.startswith("hydra.run.dir=")).split("=", 1)[1])
    folder.mkdir(parents=True, exist_ok=True)  # a relative hydra.run.dir would land in the job's cwd
    (folder / "results.json").write_text(json.dumps({"complete": True, "cwd": os.getcwd(), "argv0": sys.argv[0]}))
""")


def test_study_paths_are_the_callers_wherever_the_package_is(tmp_path, monkeypatch) -> None:
    """Fast variant: a plan made from a relative --out is absolute under the caller's folder, and a job started
    by the real subprocess runner (the package elsewhere) writes where the runner looks."""
    import experiments.studies.runner as runner
    from experiments.studies.plan import build_plan

    package, caller = tmp_path / "site", tmp_path / "caller"
    (package / "experiments").mkdir(parents=True)
    (package / "experiments" / "main.py").write_text(FAKE_MAIN)
    caller.mkdir()
    monkeypatch.setattr(runner, "PACKAGE_ROOT", package)
    monkeypatch.chdir(caller)
    config = {"name": "q", "datasets": {"folder": {"category": "widget"}}, "backbone": "resnet18", "seeds": [0],
              "common": ["storage.cache_dir=${dataset_dir}/feature_cache"], "logger": "none", "comparisons": {}}
    plan = build_plan(config, Path("studies"), {"folder": ["widget"]}, check=lambda *_: None)
    [job] = plan.jobs
    assert plan.folder == caller / "studies" / "q"
    assert job.folder == caller / "studies" / "q" / "folder" / "baseline" / "baseline"
    assert f"storage.cache_dir={caller}/studies/q/folder/feature_cache" in job.overrides
    manifest = runner.run_plan(plan, echo=lambda line: None)
    assert [row["status"] for row in manifest["jobs"]] == ["done"]
    written = json.loads((job.folder / "results.json").read_text())
    assert written["cwd"] == str(caller) and written["argv0"] == str(package / "experiments" / "main.py")
    assert json.loads((caller / "studies" / "q" / "study.json").read_text())["jobs"][0]["status"] == "done"


def test_a_real_study_runs_from_another_folder(tmp_path) -> None:
    """``experiments/study.py`` started from a temporary folder, with a relative dataset root (FOLDER_ROOT=data)
    and --out: the job (a real main.py run) finds the data and writes its results where the runner reads them."""
    caller = tmp_path / "elsewhere"
    write_tiny_category(caller / "data", "widget", size=32)
    study = caller / "tiny.yaml"
    common = [o for o in TINY if not o.startswith(("dataset=", "backbone=", "logger=", "progress="))]
    name = f"tiny_{uuid.uuid4().hex[:8]}"  # the old runner wrote studies/<name> into the repository
    study.write_text(json.dumps({"name": name, "datasets": {"folder": {"category": "widget"}}, "backbone": "resnet18",
                                 "seeds": [0], "save_model_seeds": [], "logger": "none", "comparisons": {},
                                 "common": common}))
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "study.py"), "--study", str(study),
                           "--out", "studies"], capture_output=True, text=True, cwd=caller, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "FOLDER_ROOT": "data"})
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((caller / "studies" / name / "study.json").read_text())
    assert [(row["id"], row["status"]) for row in manifest["jobs"]] == [("folder/baseline/baseline", "done")]
    results = json.loads((caller / "studies" / name / "folder" / "baseline" / "baseline" / "results.json").read_text())
    assert results["complete"] is True and results["categories"]["widget"]["n_train"] == 3
    assert not (REPO / "studies" / name).exists()
