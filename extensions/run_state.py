"""The parts of the training loop that make a run resumable bit-identically: the image order of each
epoch, the learning-rate schedules, the RNG state, and append-only JSONL logs that forget what was
written after the step a run resumes from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Sampler


class EpochBatches(Sampler[list[int]]):
    """The batches of one epoch, from batch ``start`` on: a seeded permutation, last partial batch dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, limit: int | None = None):
        self.n, self.batch_size, self.start = n, batch_size, start
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        batches = [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        self.batches = batches[start:] if limit is None else batches[start : start + limit]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lr_lambdas(total: int, head_only_steps: int) -> tuple:
    """Cosine decay to zero over the run; the backbone's starts after ``head_only_steps`` (0 before)."""

    total = max(1, total)  # a run of 0 steps never steps its schedule

    def head(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def backbone(step: int) -> float:
        if step < head_only_steps:
            return 0.0
        span = max(1, total - head_only_steps)
        return 0.5 * (1 + math.cos(math.pi * min(step - head_only_steps, span) / span))

    return backbone, head


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LossLog:
    """Append-only JSONL; on resume, lines past the resumed step (written after its checkpoint) are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the interruption
                if row.get("step", math.inf) <= resume_step:
                    rows.append(row)
        self.rows = rows
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
