"""The training loop shared by every fine-tuning method.

``fine_tune(objective, dataset, config, files, identity)`` trains ``objective.extractor`` (the
PatchCore extractor itself) and ``objective``'s head on nominal images, then writes the
fine-tuned extractor weights and their sidecar (see checkpoint.py). Along the way it keeps:

- AdamW with two parameter groups: the backbone at ``lr`` with no weight decay (L2-SP pulls it
  toward the pretrained weights instead; decay toward zero would pull it away), the freshly
  initialised head at ``head_lr`` with ``weight_decay``; cosine decay to zero over the run, the
  backbone optionally held still for the first ``head_only_steps`` (linear probe, then fine-tune);
- a resume file every ``checkpoint_every`` steps (model, head, optimiser, scheduler, RNG states,
  step): an interrupted run continues from it and ends bit-identical to an uninterrupted one on the CPU;
- a tqdm bar and a JSONL loss log (one line per step).

Determinism: ``seed`` initialises the head and the augmentation RNG; the order of the images in
epoch ``e`` is a permutation drawn from its own generator seeded with (seed, e), so it does not
depend on where a run was resumed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from core.io import file_sha256
from extensions.checkpoint import (
    FORMAT_VERSION,
    CheckpointFiles,
    load_torch,
    read_sidecar,
    save_torch,
    write_sidecar,
)
from extensions.objective import Objective
from extensions.protection import Protection, check_frozen_stages
from extensions.proxy import ProxyValidator, Selection
from extensions.run_state import EpochBatches, LossLog, lr_lambdas, rng_state, set_rng_state
from extensions.synthetic import describe

log = logging.getLogger("finetune")


@dataclass
class TrainConfig:
    """A method's ``train:`` node (conf/method/train/default.yaml): the settings every method shares."""

    epochs: int = 10
    max_steps: int | None = 40  # the CPU step budget; null: epochs decide; 0: no step (the pretrained weights)
    batch_size: int = 8
    lr: float = 1e-4  # backbone
    head_lr: float = 1e-3
    weight_decay: float = 1e-4  # head only
    frozen_stages: int | str = 1  # -1 none, 0 stem, k stem + stages 1..k, all_but_last (extensions/protection.py)
    freeze_bn: bool = True
    train_bn_affine: bool = True
    l2sp_weight: float = 0.1
    head_only_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"method.train.batch_size={self.batch_size} must be at least 1")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError(f"method.train.epochs={self.epochs} must be at least 1 (or set method.train.max_steps)")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"method.train.max_steps={self.max_steps} must be at least 0 (0: the pretrained "
                             "weights, scored by the proxy), or null to use method.train.epochs")
        check_frozen_stages(self.frozen_stages)
        if self.lr < 0 or self.head_lr <= 0 or self.weight_decay < 0:
            raise ValueError("method.train.lr must be >= 0, method.train.head_lr > 0 and "
                             "method.train.weight_decay >= 0")
        if self.head_only_steps < 0:
            raise ValueError(f"method.train.head_only_steps={self.head_only_steps} must be >= 0")

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch


class TrainingTracker(Protocol):
    """Where a run's rows go besides the JSONL logs (experiments/harness/finetune_tracking.py: W&B)."""

    def log_step(self, category: str, row: dict) -> None: ...

    def log_eval(self, category: str, row: dict) -> None: ...


def _canonical(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


def fine_tune(
    objective: Objective,
    dataset: Dataset,
    config: TrainConfig,
    files: CheckpointFiles,
    identity: dict,
    device: str | torch.device = "cpu",
    checkpoint_every: int = 50,
    num_workers: int = 0,
    progress: bool = True,
    resume: bool = True,
    proxy: ProxyValidator | None = None,
    tracker: TrainingTracker | None = None,
) -> dict:
    """Fine-tune ``objective.extractor`` on ``dataset`` (nominal training images only); return the sidecar.

    ``identity`` (method, category, base backbone spec, the run's config) and ``config`` go into the
    resume file and the sidecar: a resume file or a finished checkpoint is reused only when both match.
    A finished checkpoint is not trained again (``resume=False`` does): its sidecar is returned and
    ``objective`` is left as it was.

    With a ``proxy`` (extensions/proxy.py) the weights are evaluated at step 0, every
    ``proxy.config.eval_every`` steps and at the last step; the best evaluation's weights are the ones
    written, training stops after ``patience`` evaluations without gain, and a non-finite loss ends the
    run (the selection still holds finite weights) instead of failing it.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be at least 1 (steps between resume files)")
    device = torch.device(device)
    schedule = _Schedule.of(len(dataset), config)
    proxy_record = {} if proxy is None else {"proxy": asdict(proxy.config), "anomalies": describe(proxy.config.kinds)}
    key = _canonical({**identity, "train": asdict(config), **proxy_record})
    finished = _finished_sidecar(files, key) if resume else None
    if finished is not None:
        log.info("%s is already fine-tuned with this configuration (resume=false trains it again)", files.weights)
        return finished

    selection = Selection(proxy.config.patience, proxy.config.collapse_fraction) if proxy is not None else None
    run = _Run.start(objective, config, files, key, schedule.total, device, selection)
    run.restore_or_init(config.seed, resume, schedule.total)
    logs = _Logs.open(run, files, str(identity.get("category", "")), str(identity.get("method", "finetune")),
                      schedule, proxy is not None, tracker, progress)
    if proxy is not None and not selection.rows:
        logs.evaluation(run.evaluate(proxy), selection)  # step 0: the pretrained weights are always a candidate
    stop = _train(run, dataset, schedule, config.seed, proxy, logs, device, num_workers, checkpoint_every)
    logs.bar.close()
    summary = logs.summary(schedule, stop)
    if proxy is not None:
        summary["proxy"] = {**asdict(proxy.config), **proxy.sizes()}
        summary["anomalies"] = describe(proxy.config.kinds)
    return run.finish(identity, config, summary)


@dataclass(frozen=True)
class _Schedule:
    """How many images, steps per epoch and steps in all a run has."""

    n: int
    batch_size: int
    steps_per_epoch: int
    total: int

    @classmethod
    def of(cls, n: int, config: TrainConfig) -> _Schedule:
        if n == 0:
            raise ValueError("no training images to fine-tune on")
        batch_size = min(config.batch_size, n)
        steps_per_epoch = n // batch_size
        return cls(n, batch_size, steps_per_epoch, config.total_steps(steps_per_epoch))


def _train(run: _Run, dataset: Dataset, schedule: _Schedule, seed: int, proxy: ProxyValidator | None, logs: _Logs,
           device: torch.device, num_workers: int, checkpoint_every: int) -> str | None:
    """Epochs of steps from ``run.step`` to the last step; the reason training stopped early, or None."""
    loader_generator = torch.Generator().manual_seed(seed)  # worker seeds; keeps the global RNG untouched
    while run.step < schedule.total:
        epoch, offset = divmod(run.step, schedule.steps_per_epoch)
        batches = EpochBatches(schedule.n, schedule.batch_size, seed, epoch, offset, limit=schedule.total - run.step)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=loader_generator,
                            pin_memory=device.type == "cuda")
        for batch in loader:
            stop = _step(run, batch, device, epoch, proxy, logs, schedule.total, checkpoint_every)
            if stop is not None:
                return stop
    return None


def _step(run: _Run, batch, device: torch.device, epoch: int, proxy: ProxyValidator | None, logs: _Logs,
          total: int, checkpoint_every: int) -> str | None:
    """One training step with its logging, proxy evaluation and resume file; the reason to stop, or None."""
    category = logs.category
    try:
        row = run.train_step(batch, device, epoch)
    except FloatingPointError as error:
        if proxy is None:
            raise
        stop = f"diverged at step {run.step + 1} ({error})"
        log.warning("%s: %s; keeping the best weights by the proxy", category, stop)
        return stop
    logs.step(row)
    if proxy is not None and (run.step % proxy.config.eval_every == 0 or run.step == total):
        logs.evaluation(run.evaluate(proxy), run.selection)
        if run.selection.exhausted and run.step < total:
            stop = (f"early stop at step {run.step}: {proxy.config.patience} evaluations without gain "
                    f"over step {run.selection.best['step']}")
            log.info("%s: %s", category, stop)
            return stop
    if run.step % checkpoint_every == 0 and run.step < total:
        run.save_state()
    return None


@dataclass
class _Logs:
    """Where every step and evaluation row goes: the JSONL logs, the tracker, the progress bar."""

    category: str
    loss_log: LossLog
    proxy_log: LossLog | None
    bar: tqdm
    tracker: TrainingTracker | None
    recent: deque
    last: dict = field(default_factory=dict)

    @classmethod
    def open(cls, run: _Run, files: CheckpointFiles, category: str, method: str, schedule: _Schedule,
             with_proxy: bool, tracker: TrainingTracker | None, progress: bool) -> _Logs:
        """The logs continued from ``run.step`` (a resumed run keeps its rows up to there)."""
        loss_log = LossLog(files.loss_log, run.step)
        proxy_log = LossLog(files.proxy_log, run.step) if with_proxy else None
        recent = deque((row["loss"] for row in loss_log.rows), maxlen=schedule.steps_per_epoch)
        bar = tqdm(total=schedule.total, initial=run.step, disable=not progress, dynamic_ncols=True,
                   desc=f"{method} {category}")
        return cls(category, loss_log, proxy_log, bar, tracker, recent)

    def step(self, row: dict) -> None:
        self.last = row
        self.loss_log.append(row)
        if self.tracker is not None:
            self.tracker.log_step(self.category, row)
        self.recent.append(row["loss"])
        self.bar.update(1)
        if self.proxy_log is None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", l2sp=f"{row['l2sp']:.2e}")

    def evaluation(self, row: dict, selection: Selection) -> None:
        self.proxy_log.append(row)
        if self.tracker is not None:
            self.tracker.log_eval(self.category, row)
        self.bar.set_postfix(proxy=f"{row['score'] if row['score'] is None else round(row['score'], 4)}",
                             best=selection.best["step"] if selection.best else None)

    def summary(self, schedule: _Schedule, stop: str | None) -> dict:
        """The run's numbers for the sidecar (the last loss, and the mean over the last epoch's steps)."""
        rows = self.loss_log.rows
        window = [row["accuracy"] for row in rows[-schedule.steps_per_epoch :] if "accuracy" in row]
        return {"n_train_images": schedule.n, "steps_per_epoch": schedule.steps_per_epoch, "stop_reason": stop,
                "final_loss": self.last.get("loss", rows[-1]["loss"] if rows else None),
                "final_loss_mean": sum(self.recent) / len(self.recent) if self.recent else None,
                "final_accuracy_mean": sum(window) / len(window) if window else None}


def _finished_sidecar(files: CheckpointFiles, key: str) -> dict | None:
    """The sidecar of a complete checkpoint made with this identity whose weights are intact, else None."""
    sidecar = read_sidecar(files)
    if (sidecar and sidecar.get("complete") and sidecar.get("identity") == key and files.weights.is_file()
            and sidecar.get("sha256") == file_sha256(files.weights)):
        return sidecar
    return None


@dataclass
class _Run:
    """The state of one fine-tuning run, which is what a resume file holds; ``step`` counts finished steps."""

    objective: Objective
    protection: Protection
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    files: CheckpointFiles
    key: str
    selection: Selection | None = None
    step: int = 0
    elapsed: float = 0.0

    @classmethod
    def start(cls, objective: Objective, config: TrainConfig, files: CheckpointFiles, key: str, total: int,
              device: torch.device, selection: Selection | None = None) -> _Run:
        """Protection on the pretrained weights (L2-SP's reference), AdamW with two groups, cosine schedules."""
        protection = Protection(
            objective.extractor, config.frozen_stages, config.freeze_bn, config.train_bn_affine, config.l2sp_weight
        )  # built before any training step: the weights it holds are L2-SP's reference
        backbone_params = protection.parameters()
        objective.to(device)
        protection.to(device)
        optimizer = torch.optim.AdamW(
            [
                {"params": backbone_params, "lr": config.lr, "weight_decay": 0.0},
                {"params": objective.head_parameters(), "lr": config.head_lr, "weight_decay": config.weight_decay},
            ]
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, list(lr_lambdas(total, config.head_only_steps)))
        return cls(objective, protection, optimizer, scheduler, files, key, selection)

    def restore_or_init(self, seed: int, resume: bool, total: int) -> None:
        """Continue from this configuration's resume file, or start over: seed, then a fresh head."""
        files = self.files
        state = load_torch(files.state) if resume and files.state.is_file() else None
        if state is not None and (state.get("format_version") != FORMAT_VERSION or state.get("identity") != self.key):
            log.warning("%s belongs to another configuration: starting over", files.state)
            state = None
        if state is None:
            torch.manual_seed(seed)
            self.objective.reset_head()
            return
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.selection is not None:
            self.selection.load_state_dict(state["selection"])
        set_rng_state(state["rng"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed_s"])
        log.info("resuming %s from step %d of %d", files.state, self.step, total)

    def train_step(self, batch, device: torch.device, epoch: int) -> dict:
        """One optimiser step on a batch; returns its loss-log row."""
        started = time.perf_counter()
        self.protection.train_mode()
        images = (batch["image"] if isinstance(batch, dict) else batch).to(device, non_blocking=True)
        task_loss, stats = self.objective.loss(images)
        penalty = self.protection.penalty()
        loss = task_loss + penalty
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {self.step + 1}: lower method.train.lr / method.train.head_lr "
                f"(the last good state is {self.files.state if self.files.state.is_file() else 'not saved yet'})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        lrs = self.scheduler.get_last_lr()
        self.scheduler.step()
        self.step += 1
        self.elapsed += time.perf_counter() - started
        return {"step": self.step, "epoch": epoch, "loss": loss.item(), "task_loss": task_loss.item(),
                "l2sp": penalty.item(), "lr_backbone": lrs[0], "lr_head": lrs[1], **stats,
                "time_s": round(self.elapsed, 3)}

    def evaluate(self, proxy: ProxyValidator) -> dict:
        """A proxy evaluation of the current weights, with the weight-distance monitor, recorded in the selection."""
        row = {**proxy.evaluate(self.objective.extractor, self.step), **self.protection.weight_distance()}
        self.selection.update(row, self.objective.extractor)
        return row

    def save_state(self) -> None:
        """The resume file: everything an interrupted run needs to continue bit-identically."""
        state = {
            "format_version": FORMAT_VERSION, "identity": self.key, "step": self.step, "elapsed_s": self.elapsed,
            "objective": self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
        }
        if self.selection is not None:
            state["selection"] = self.selection.state_dict()
        save_torch(self.files.state, state)

    def finish(self, identity: dict, config: TrainConfig, summary: dict) -> dict:
        """Write the selected (else the last) extractor weights and their sidecar, drop the resume file."""
        files, extractor = self.files, self.objective.extractor
        selected = self.step
        if self.selection is not None and self.selection.best_state is not None:
            extractor.load_state_dict(self.selection.best_state)
            selected = int(self.selection.best["step"])
        extractor.eval()
        base = {"name": extractor.name, **extractor.spec()}
        save_torch(files.weights, {
            "format_version": FORMAT_VERSION, "method": identity.get("method"), "category": identity.get("category"),
            "base": base, "step": selected, "state_dict": extractor.state_dict(),
        })
        steps_per_epoch = summary["steps_per_epoch"]
        record = {
            "complete": True,
            "method": identity.get("method"),
            "category": identity.get("category"),
            "base_backbone": base,
            "config": {**identity.get("config", {}), "train": asdict(config)},
            "steps": self.step,
            "selected_step": selected,
            "stop_reason": summary["stop_reason"],
            "steps_per_epoch": steps_per_epoch,
            "epochs": self.step / steps_per_epoch,
            "n_train_images": summary["n_train_images"],
            "final_loss": summary["final_loss"],
            "final_loss_mean": summary["final_loss_mean"],
            "final_accuracy_mean": summary["final_accuracy_mean"],
            "chance_accuracy": getattr(self.objective, "chance_accuracy", None),
            "train_time_s": round(self.elapsed, 3),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "sha256": file_sha256(files.weights),
            "loss_log": files.loss_log.name,
            "identity": self.key,
        }
        if self.selection is not None:
            record["selection"] = {**self.selection.summary(), "config": summary["proxy"],
                                   "anomalies": summary["anomalies"],
                                   "eval_time_s": round(sum(r["eval_time_s"] for r in self.selection.rows), 3),
                                   "proxy_log": files.proxy_log.name}
        write_sidecar(files, record)
        files.state.unlink(missing_ok=True)
        log.info("fine-tuned %s: %d steps, selected step %d, final loss %s -> %s", identity.get("category"),
                 self.step, selected, record["final_loss"], files.weights)
        return record
