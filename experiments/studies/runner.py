"""Running a study's plan: one subprocess per job (the suite's own CLIs), finished jobs skipped, a progress
line per job with the time left, and the study manifest (``study.json``) rewritten after every job.

A PatchCore job is done when its folder holds a complete ``results.json``; a fine-tuning job when every
checkpoint it makes exists with its sidecar; a select job (experiments/selection.py) when its ``selection.json``
is complete. A job that fails is recorded with the tail of its log and the study goes on; the jobs that need it
are recorded as blocked. Nothing is ever silently dropped: the
manifest lists every job (done, skipped because done before, failed, blocked) and every arm that could
not run here (``skipped``), and the report reads it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from core.io import write_json_atomic
from experiments.studies.plan import Plan, RunSpec

MANIFEST = "study.json"
LOG = "study.log"
Runner = Callable[[list[str], Path], int]  # (command, log file) -> exit status


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds experiments/ and core/: a checkout or site-packages


def subprocess_runner(command: list[str], log_path: Path) -> int:
    """Run ``command`` (``python experiments/<script>.py ...``), its output into ``log_path``.

    The job runs in the caller's working directory, where the study's paths were resolved (a job that ran in
    the package's folder wrote its results where the runner never looked), with the script and the package
    taken from where this runner was imported (a checkout or an installed wheel). It dies with the runner
    (``_die_with_parent``): a runner killed with -9 leaves no job behind for a re-run to duplicate.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    python, script, *rest = command
    path = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run([python, str(PACKAGE_ROOT / script), *rest], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONPATH": path},
                              preexec_fn=_die_with_parent()).returncode


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for Linux: the child gets SIGKILL when the runner dies (``PR_SET_PDEATHSIG``), and exits at
    once should the runner already have died between fork and prctl. Unlike a new process group, it still
    gets the terminal's Ctrl-C with the runner; unlike a child polling its parent, it needs no change in the job.
    Elsewhere (no prctl) None: the child is left as it was."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing is imported after the fork
    parent, set_death_signal = os.getpid(), 1  # PR_SET_PDEATHSIG (linux/prctl.h)

    def preexec() -> None:
        prctl(set_death_signal, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def is_done(job: RunSpec) -> bool:
    if job.kind == "finetune":
        return bool(job.checkpoints) and all(p.is_file() and p.with_suffix(".json").is_file() for p in job.checkpoints)
    path = job.folder / ("selection.json" if job.kind == "select" else "results.json")
    try:
        return json.loads(path.read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def estimate_left(durations: dict[str, list[float]], pending: list[RunSpec]) -> float | None:
    """Seconds left: each pending job at the mean duration of the jobs of its kind run so far (any kind's mean
    when none of its kind has run yet); None before any job has run."""
    every = [d for values in durations.values() for d in values]
    if not every:
        return None
    fallback = sum(every) / len(every)
    means = {kind: sum(values) / len(values) for kind, values in durations.items() if values}
    return sum(means.get(job.kind, fallback) for job in pending)


def machine() -> dict:
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def _previous_durations(manifest_path: Path) -> dict[str, dict]:
    """The rows of an earlier manifest of this study (their durations are kept for runs done before)."""
    if not manifest_path.is_file():
        return {}
    try:
        return {row["id"]: row for row in json.loads(manifest_path.read_text()).get("jobs", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _new_manifest(plan: Plan, previous: dict[str, dict]) -> dict:
    manifest = {"study": plan.name, "source": plan.config.get("source"), "config": plan.config,
                "datasets": plan.datasets, "folder": str(plan.folder),
                "started": dt.datetime.now().isoformat(timespec="seconds"), "finished": None,
                "command": " ".join(["python experiments/study.py", *sys.argv[1:]]),
                "machine": machine(), "comparisons": plan.comparisons, "skipped": plan.skipped}
    manifest["jobs"] = [{"id": job.id, "kind": job.kind, "dataset": job.dataset, "comparison": job.comparison,
                         "arm": job.arm,
                         "seed": job.seed, "folder": str(job.folder), "command": " ".join(job.command("python")),
                         "needs": job.needs, "status": "pending",
                         "duration_s": previous.get(job.id, {}).get("duration_s")} for job in plan.jobs]
    return manifest


def _not_to_run(job: RunSpec, row: dict, rows: dict[str, dict]) -> str | None:
    """Why ``job`` does not run now (done before, or blocked by a job that did not finish), recorded in its
    row; None when it is to run."""
    if is_done(job):
        row["status"] = "done before"
        return "done before, skipped"
    blocked = [need for need in job.needs if rows[need]["status"] not in ("done", "done before")]
    if blocked:
        row["status"] = "blocked"
        row["error"] = f"needs {', '.join(blocked)}, which did not finish"
        return f"blocked ({row['error']})"
    return None


def _execute(job: RunSpec, row: dict, runner: Runner, python: str) -> float:
    """Run ``job``; its row says whether it finished. Returns how long it ran."""
    log_path = job.folder / LOG
    begin = time.perf_counter()
    code = runner(job.command(python), log_path)
    took = time.perf_counter() - begin
    row["duration_s"] = round(took, 1)
    if code == 0 and is_done(job):
        row["status"] = "done"
    else:
        row["status"] = "failed"
        row["error"] = f"exit status {code}; {log_path}: {_tail(log_path)}"
    return took


def run_plan(plan: Plan, runner: Runner = subprocess_runner, python: str = sys.executable,
             echo: Callable[[str], None] = print) -> dict:
    """Run every job not done yet, in order; returns the manifest (also ``<study folder>/study.json``)."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    manifest_path = plan.folder / MANIFEST
    started = time.time()
    manifest = _new_manifest(plan, _previous_durations(manifest_path))
    rows = {row["id"]: row for row in manifest["jobs"]}
    for row in plan.skipped:
        echo(f"skipped: {row['dataset']}/{row['comparison']}/{row['arm']}: {row['reason']}")
    durations: dict[str, list[float]] = {}
    total = len(plan.jobs)
    for index, job in enumerate(plan.jobs, 1):
        row = rows[job.id]
        skipped = _not_to_run(job, row, rows)
        if skipped:
            echo(f"[{index}/{total}] {job.id}: {skipped}")
            write_json_atomic(manifest_path, manifest)
            continue
        row["status"] = "running"
        write_json_atomic(manifest_path, manifest)
        took = _execute(job, row, runner, python)
        if row["status"] == "done":
            durations.setdefault(job.kind, []).append(took)
        pending = [j for j in plan.jobs[index:] if not is_done(j)]
        left = estimate_left(durations, pending)
        echo(f"[{index}/{total}] {job.id}: {row['status']} in {format_duration(took)} "
             f"(elapsed {format_duration(time.time() - started)}, about {format_duration(left)} left for "
             f"{len(pending)} jobs)")
        write_json_atomic(manifest_path, manifest)
    manifest["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    manifest["wall_s"] = round(time.time() - started, 1)
    manifest["run_s"] = round(sum(row["duration_s"] or 0 for row in rows.values()), 1)  # all sessions' runs
    write_json_atomic(manifest_path, manifest)
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    echo(f"study {plan.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
         + f"; {len(plan.skipped)} arms skipped; {format_duration(manifest['wall_s'])} this session; "
           f"manifest {manifest_path}")
    return manifest
