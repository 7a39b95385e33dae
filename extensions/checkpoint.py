"""Fine-tuning checkpoint files, and ``FineTunedBackbone``: the PatchCore extractor that loads one.

For one (method, base backbone, category) the files live side by side:

    checkpoints/<method>/<backbone>/<category>.pt          fine-tuned extractor weights (what PatchCore loads)
    checkpoints/<method>/<backbone>/<category>.json        sidecar: base backbone, method, config, steps, loss, date
    checkpoints/<method>/<backbone>/<category>.loss.jsonl  one line per training step
    checkpoints/<method>/<backbone>/<category>.proxy.jsonl one line per proxy evaluation (extensions/proxy.py)
    checkpoints/<method>/<backbone>/<category>.resume.pt   training state while a run is unfinished
    checkpoints/<method>/<backbone>/<category>.lock        held (flock) by the one process fine-tuning it

Every file is written atomically (temp file + rename) and every ``.pt`` is read with
``torch.load(..., weights_only=True)``: plain tensors and containers, no pickled code.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.backbones import FeatureExtractor, build_extractor
from core.io import atomic_write, file_sha256, write_json_atomic

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class MissingCheckpointError(FileNotFoundError):
    """The fine-tuned checkpoint PatchCore asks for does not exist; the message names the command that makes it."""


class CheckpointMismatchError(ValueError):
    """A checkpoint is not the one the configuration (or a saved model) refers to."""


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one fine-tuning run, all next to ``weights``."""

    weights: Path

    @classmethod
    def for_run(cls, root: str | Path, method: str, backbone: str, category: str) -> CheckpointFiles:
        return cls(Path(root) / method / backbone / f"{category}.pt")

    @property
    def sidecar(self) -> Path:
        return self.weights.with_suffix(".json")

    @property
    def loss_log(self) -> Path:
        return self.weights.with_suffix(".loss.jsonl")

    @property
    def proxy_log(self) -> Path:
        return self.weights.with_suffix(".proxy.jsonl")

    @property
    def state(self) -> Path:
        return self.weights.with_suffix(".resume.pt")

    @property
    def lock(self) -> Path:
        return self.weights.with_suffix(".lock")


class CheckpointBusyError(ValueError):
    """Another live process is fine-tuning the same checkpoint; the message names its PID and the lock file."""


@contextmanager
def hold_checkpoint(files: CheckpointFiles) -> Iterator[Path]:
    """One writer per checkpoint: an exclusive ``flock`` on ``files.lock`` for the block, taken without waiting.

    A second fine-tune of the same category and method is refused at once, naming the holder's PID: waiting
    would hide a duplicate start (a study re-run, a second terminal) for as long as the first one trains, and
    would then find the checkpoint finished anyway. The kernel releases the lock when its process dies (kill -9
    included), so a lock file left behind never blocks; the file itself stays (removing it would race with a
    process that has just opened it)."""
    path = files.lock
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            raise CheckpointBusyError(
                f"{files.weights} is being fine-tuned by process {holder.get('pid', '(starting)')} on "
                f"{holder.get('host', 'this machine')} (it holds {path}): wait for it to finish, then re-run "
                "to use its checkpoint; or stop it first") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(handle, 0)  # no stale PID for the next reader
    finally:
        os.close(handle)  # releases the lock


def _holder(handle: int) -> dict:
    """What the lock's holder wrote into it (its PID and host), or {} while it has not written yet."""
    try:
        record = json.loads(os.pread(handle, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` through a temp file and a rename: a crash leaves the old file or the new one."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; a clear error for an unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointMismatchError(
            f"cannot read checkpoint {path}: {error}. Delete it and fine-tune again."
        ) from error


def write_sidecar(files: CheckpointFiles, record: dict) -> Path:
    return write_json_atomic(files.sidecar, record)


def read_sidecar(files: CheckpointFiles) -> dict | None:
    """The sidecar, or None when it is missing or does not fit its schema (then the run is not finished:
    fine-tuning runs again rather than trusting it)."""
    try:
        record = json.loads(files.sidecar.read_text())
    except (OSError, ValueError):
        return None
    problem = _sidecar_problem(record)
    if problem:
        log.warning("ignoring sidecar %s: %s", files.sidecar, problem)
        return None
    return record


def finetune_command(method: str, base: str, category: str) -> str:
    """The command that fine-tunes ``base`` with ``method`` on ``category`` (it writes the checkpoint)."""
    return (f"python experiments/finetune.py method={method} backbone={base} dataset=<dataset> "
            f"category={category}")


def missing_message(path: Path, method: str | None, base: str | None, category, how: str | None = None) -> str:
    """Why a checkpoint is missing and how to make it; ``how`` replaces the default (the fine-tuning command)."""
    what = f"{method or 'fine-tuned'} checkpoint for category {category!r} on base backbone {base}"
    if how is None and method and base and isinstance(category, str):
        how = f"Make it with `{finetune_command(method, base, category)}`"
    how = how or "Make it with experiments/finetune.py (see the README section on fine-tuning)"
    return f"no {what}: {path} does not exist. {how}; or point backbone.checkpoint at an existing file."


class FineTunedBackbone(FeatureExtractor):
    """A base extractor (wrn50, resnet18/50, effnet_lite0) with weights fine-tuned by ``extensions``.

    Checkpoints are per category: conf/backbone/finetuned.yaml (``backbone=finetuned backbone.method=<name>``)
    names the file with ``${category}``, and the harness builds one extractor per category (``category`` is only used to
    check that and in messages). Same ``layers``, ``mean``, ``std`` and ``interpolation`` as the base;
    ``spec()`` names the resolved file and its SHA-256, so a saved PatchCore model refuses a checkpoint
    that has been retrained since.
    """

    def __init__(
        self,
        checkpoint: str,
        method: str | None = None,
        base: str | None = None,
        category: str | Sequence[str] | None = None,
        name: str | None = None,
        sha256: str | None = None,
    ) -> None:
        super().__init__()
        path = self._resolve(str(checkpoint), category, method)
        if not path.is_file():
            raise MissingCheckpointError(missing_message(path, method, base, category))
        payload, digest = _read_checkpoint(path, method, base, sha256)
        # The checkpoint holds every weight: the base is built without loading pretrained ones.
        self.model = build_extractor(payload["base"], overrides={"pretrained": False, "weights_path": None})
        self.model.load_state_dict(payload["state_dict"])
        self.model.eval()
        self.layers = list(self.model.layers)
        self.mean, self.std = tuple(self.model.mean), tuple(self.model.std)
        self.interpolation = self.model.interpolation
        self.method = payload["method"]
        self.base = payload["base"]["name"]
        self.checkpoint = path
        self.steps = int(payload.get("step", 0))
        self.name = name or f"{self.method}_{self.base}"
        self._spec_kwargs = dict(
            checkpoint=str(path), method=self.method, base=self.base,
            category=category if isinstance(category, str) else None, name=self.name, sha256=digest,
        )

    @staticmethod
    def _resolve(checkpoint: str, category, method: str | None) -> Path:
        if category is not None and (not isinstance(category, str) or category == "all"):
            raise ValueError(
                f"backbone.method={method or 'fine-tuned'} loads one checkpoint per category, "
                f"but category={category!r} "
                f"(checkpoint {checkpoint}): experiments/main.py builds it once per category; "
                "elsewhere pass a single category=<name>"
            )
        return Path(checkpoint).expanduser()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model(images)


def _read_checkpoint(path: Path, method: str | None, base: str | None, sha256: str | None) -> tuple[dict, str]:
    """(payload, SHA-256) of a checkpoint, refused when it is not the one ``method``/``base``/``sha256`` expect."""
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256:
        raise CheckpointMismatchError(
            f"{path} has changed since this model was made (SHA-256 {digest[:12]}..., expected "
            f"{sha256[:12]}...): it was fine-tuned again. Refit the PatchCore model."
        )
    payload = load_torch(path)
    problem = _payload_problem(payload)
    if problem:
        raise CheckpointMismatchError(f"checkpoint {path} is not valid: {problem}; fine-tune again")
    if method is not None and payload["method"] != method:
        raise CheckpointMismatchError(f"{path} was made by method {payload['method']!r}, not {method!r}")
    base_name = payload["base"]["name"]
    if base is not None and base_name != base:
        raise CheckpointMismatchError(
            f"{path} was fine-tuned from {base_name!r}, but backbone.base={base!r}: set backbone.base={base_name}"
        )
    return payload, digest


def _payload_problem(payload) -> str | None:
    """What is wrong with a checkpoint's contents (checked before its base extractor is built), or None."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a dict"
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        return f"format_version={version!r}, this code reads {FORMAT_VERSION}"
    base = payload.get("base")
    if not isinstance(payload.get("method"), str):
        return f"method={payload.get('method')!r} must be a string"
    if not (isinstance(base, dict) and isinstance(base.get("name"), str) and isinstance(base.get("target"), str)
            and isinstance(base.get("kwargs", {}), dict)):
        return "base must be {'name': str, 'target': '<module>.<Class>', 'kwargs': {...}}"
    state = payload.get("state_dict")
    if not (isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        return "state_dict must map parameter names to tensors"
    if not isinstance(payload.get("step", 0), int):
        return f"step={payload.get('step')!r} must be an integer"
    return None


_SIDECAR_TYPES = {"complete": bool, "identity": str, "sha256": str}


def _sidecar_problem(record) -> str | None:
    """What is wrong with a sidecar's keys that resume reads, or None (other keys are informational)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    wrong = [key for key, kind in _SIDECAR_TYPES.items() if key in record and not isinstance(record[key], kind)]
    return f"keys {wrong} have the wrong type" if wrong else None


def is_finetuned(backbone: Any) -> bool:
    """Whether a backbone config node (or a results.json copy of one) builds a fine-tuned checkpoint: the
    one answer to that question for the harness, the study planner and the report. Reads the class name
    only (nothing is imported), so it is safe on any record."""
    target = backbone.get("_target_") if hasattr(backbone, "get") else None
    return target == f"{FineTunedBackbone.__module__}.{FineTunedBackbone.__qualname__}"
