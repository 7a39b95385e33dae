"""Fine-tuning on CUDA: a few steps, and a run interrupted mid-epoch then resumed ends bit for bit where
the uninterrupted run does (tests/test_finetune.py's CPU resume test, on the GPU).

Bit-exact on a GPU needs deterministic kernels: cuDNN's backward convolutions and cuBLAS's split-K
reductions otherwise add in an order that varies from run to run. The test switches them to the
deterministic ones (``warn_only``: an op without one warns, and the comparison says whether it mattered).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.backbones import TorchvisionCNN
from extensions.checkpoint import CheckpointFiles, load_torch
from extensions.cutmix_contrastive import CutMixContrastive
from extensions.training import TrainConfig, fine_tune
from tests.conftest import interrupt_at_call

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZE = 32  # tiny images, as in tests/test_finetune.py


@pytest.fixture(autouse=True)
def deterministic_kernels() -> Iterator[None]:
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic = saved[2]


def objective() -> CutMixContrastive:
    extractor = TorchvisionCNN("resnet18", ["layer2", "layer3"], pretrained=False, name="resnet18")
    return CutMixContrastive(extractor, hidden_dim=16, projection_dim=8)


def tiny_dataset(n: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, SIZE, SIZE, generator=generator)} for _ in range(n)]


def train(root: Path, model: CutMixContrastive, dataset, steps: int = 3) -> dict:
    config = TrainConfig(max_steps=steps, batch_size=2, lr=1e-3)
    files = CheckpointFiles.for_run(root / "ckpt", model.name, "resnet18", "run")
    identity = {"method": model.name, "category": "run", "base": model.extractor.spec(), "config": {}}
    return fine_tune(model, dataset, config, files, identity, device="cuda", progress=False, checkpoint_every=1)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def losses(root: Path) -> list[tuple[int, float]]:
    path = root / "ckpt" / "cutmix_contrastive" / "resnet18" / "run.loss.jsonl"
    return [(row["step"], row["loss"]) for row in map(json.loads, path.read_text().splitlines())]


def test_fine_tuning_on_cuda_resumes_bit_exact(tmp_path) -> None:
    dataset = tiny_dataset(4)  # 2 steps per epoch, 3 steps, a resume file after every step
    straight = objective()
    record = train(tmp_path / "straight", straight, dataset)
    assert record["steps"] == 3 and math.isfinite(record["final_loss"])
    assert next(straight.parameters()).is_cuda

    interrupted = objective()
    interrupt_at_call(interrupted, 2)  # a Ctrl-C inside step 2
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", interrupted, dataset)
    files = CheckpointFiles.for_run(tmp_path / "resumed" / "ckpt", "cutmix_contrastive", "resnet18", "run")
    assert load_torch(files.state)["step"] == 1  # resumes mid-epoch, then crosses into epoch 2

    resumed = objective()  # a new process would start from fresh weights
    train(tmp_path / "resumed", resumed, dataset)
    expected, actual = snapshot(straight), snapshot(resumed)
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert not files.state.exists()
