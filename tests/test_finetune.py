"""Backbone fine-tuning (extensions/): protections, the two objectives by hand, determinism, resume,
the checkpoint extractor in PatchCore, and finetune.py end to end on a tiny folder dataset."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from core.backbones import EfficientNetLite, TorchvisionCNN
from core.features import PatchEmbedder
from core.patchcore import PatchCore
from experiments.harness.backbones import per_category_backbones
from extensions.checkpoint import (
    CheckpointFiles,
    CheckpointMismatchError,
    FineTunedBackbone,
    MissingCheckpointError,
    is_finetuned,
    load_torch,
)
from extensions.cutmix_contrastive import CutMixContrastive, CutMixPlan, cutmix, nt_xent, plan_cutmix
from extensions.protection import Protection, stages
from extensions.rotation import RotationPrediction, rotate_batch
from extensions.training import TrainConfig, fine_tune
from tests.conftest import CONF_DIR, interrupt_at_call, write_tiny_category

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # tiny images: resnet18 layer2/layer3 maps are 4x4 / 2x2


def resnet18() -> TorchvisionCNN:
    return TorchvisionCNN("resnet18", ["layer2", "layer3"], pretrained=False, name="resnet18")


def tiny_dataset(n: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, SIZE, SIZE, generator=generator)} for _ in range(n)]


def train(tmp_path: Path, objective, dataset, *, name: str = "run", steps: int = 1, checkpoint_every: int = 2,
          **overrides) -> dict:
    config = TrainConfig(**{"max_steps": steps, "batch_size": 2, "lr": 1e-3, **overrides})
    files = CheckpointFiles.for_run(tmp_path / "ckpt", objective.name, "resnet18", name)
    identity = {"method": objective.name, "category": name, "base": objective.extractor.spec(), "config": {}}
    return fine_tune(objective, dataset, config, files, identity, progress=False, checkpoint_every=checkpoint_every)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# --------------------------------------------------------------------------- protections


def test_one_step_trains_unfrozen_weights_only_and_keeps_bn_statistics(tmp_path) -> None:
    extractor = resnet18()
    before = snapshot(extractor)
    train(tmp_path, RotationPrediction(extractor, hidden_dim=16), tiny_dataset())
    after = extractor.state_dict()
    frozen = ("body.conv1.", "body.bn1.", "body.layer1.")
    stats = ("running_mean", "running_var", "num_batches_tracked")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    params = {name for name, _ in extractor.named_parameters()}
    assert not {name for name in changed if name.startswith(frozen)}  # stem and stage 1 untouched
    assert not {name for name in changed if name.endswith(stats)}  # BN statistics stay ImageNet's
    trainable = {name for name in params if not name.startswith(frozen)}
    assert trainable and changed == trainable  # every unfrozen weight (incl. BN affine) moved
    assert any(".bn" in name for name in changed)


def test_all_but_last_trains_only_the_last_patchcore_stage_and_the_rest_stays_bit_identical(tmp_path) -> None:
    for extractor, last in ((resnet18(), ("body.layer3.",)),
                            (EfficientNetLite(pretrained=False), tuple(f"blocks.{i}." for i in range(5, 11)))):
        before = snapshot(extractor)
        record = train(tmp_path, RotationPrediction(extractor, hidden_dim=16), tiny_dataset(),
                       name=extractor.name, steps=2, frozen_stages="all_but_last")
        after = extractor.state_dict()
        params = {name for name, _ in extractor.named_parameters()}
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert changed == {name for name in params if name.startswith(last)}, extractor.name  # all of it moved
        assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith(last))  # bit-identical
        assert record["steps"] == 2 and record["final_accuracy_mean"] is not None and record["chance_accuracy"] == 0.25
        assert 0 <= record["final_accuracy_mean"] <= 1
    with pytest.raises(ValueError, match="frozen_stages='last'.*all_but_last"):
        TrainConfig(frozen_stages="last")


def test_zero_steps_keeps_the_pretrained_weights(tmp_path) -> None:
    extractor = resnet18()
    before = snapshot(extractor)
    record = train(tmp_path, RotationPrediction(extractor, hidden_dim=16), tiny_dataset(), steps=0)
    assert record["steps"] == 0 and record["selected_step"] == 0 and record["final_loss"] is None
    payload = torch.load(tmp_path / "ckpt" / "rotation" / "resnet18" / "run.pt", weights_only=True)
    assert all(torch.equal(before[name], payload["state_dict"][name]) for name in before)
    with pytest.raises(ValueError, match="max_steps=-1 must be at least 0"):
        TrainConfig(max_steps=-1)


def test_the_cpu_default_is_a_step_budget_and_the_gpu_recipe_counts_epochs() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cpu = compose("finetune", overrides=["method=rotation"]).method.train
        gpu = compose("finetune", overrides=["method=cutmix_contrastive", "method/train=gpu"]).method.train
    assert TrainConfig(**cpu).total_steps(steps_per_epoch=64) == 40 == TrainConfig(**cpu).total_steps(4)
    assert TrainConfig(**gpu).total_steps(steps_per_epoch=9) == 270 and gpu.batch_size == 32 and gpu.lr == cpu.lr


def test_switching_protections_off(tmp_path) -> None:
    extractor = resnet18()
    before = snapshot(extractor)
    train(tmp_path, RotationPrediction(extractor, hidden_dim=16), tiny_dataset(), frozen_stages=-1,
          freeze_bn=False, train_bn_affine=False)
    after = extractor.state_dict()
    assert not torch.equal(before["body.conv1.weight"], after["body.conv1.weight"])
    assert not torch.equal(before["body.layer2.0.bn1.running_mean"], after["body.layer2.0.bn1.running_mean"])
    assert torch.equal(before["body.layer2.0.bn1.weight"], after["body.layer2.0.bn1.weight"])  # affine frozen


def test_stage_rules_match_strides() -> None:
    torchvision_stages = stages(resnet18())
    assert [len(group) for group in torchvision_stages] == [2, 1, 1, 1]  # [conv1, bn1], layer1..layer3
    effnet = EfficientNetLite(pretrained=False)
    groups = stages(effnet)
    block_ids = [[i for i, block in enumerate(effnet.blocks) if any(block is m for m in g)] for g in groups]
    assert block_ids == [[0], [1, 2], [3, 4], [5, 6, 7, 8, 9, 10]]  # strides 2 (stem), 4, 8, 16
    assert groups[0][0] is effnet.stem
    with pytest.raises(ValueError, match="nothing would be fine-tuned"):
        Protection(resnet18(), frozen_stages=3)


def test_l2sp_penalty_by_hand() -> None:
    extractor = resnet18()
    protection = Protection(extractor, frozen_stages=1, l2sp_weight=0.2)
    assert protection.penalty().item() == 0.0
    weight = extractor.get_parameter("body.layer2.0.conv1.weight")
    with torch.no_grad():
        weight += 0.1  # n elements, each 0.1 away from w0
        extractor.body.conv1.weight += 5.0  # frozen: not part of the penalty
    n = weight.numel()
    penalty = protection.penalty()
    assert penalty.item() == pytest.approx(0.2 / 2 * n * 0.1**2, rel=1e-4)
    penalty.backward()
    torch.testing.assert_close(weight.grad, torch.full_like(weight, 0.2 * 0.1))  # d/dw = weight * (w - w0)
    assert extractor.body.conv1.weight.grad is None and not extractor.body.conv1.weight.requires_grad


# --------------------------------------------------------------------------- objectives by hand


def test_rotations_and_labels() -> None:
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 3, 2, 2)
    rotated, labels = rotate_batch(torch.cat([image, 10 * image]))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    expected = [  # counter-clockwise quarter turns of [[1, 2], [3, 4]]
        [[1.0, 2.0], [3.0, 4.0]], [[2.0, 4.0], [1.0, 3.0]], [[4.0, 3.0], [2.0, 1.0]], [[3.0, 1.0], [4.0, 2.0]],
    ]
    for k, grid in enumerate(expected):
        assert rotated[2 * k, 0].tolist() == grid  # image 0, every channel
        assert rotated[2 * k + 1, 2].tolist() == (10 * torch.tensor(grid)).tolist()  # image 1
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(1, 3, 2, 4))


def test_cutmix_paste_by_hand() -> None:
    images = torch.stack([torch.zeros(1, 4, 4), torch.arange(16.0).view(1, 4, 4)])
    plan = CutMixPlan(source=torch.tensor([1, 1]), size=torch.tensor([[2, 2], [1, 3]]),
                      src=torch.tensor([[1, 1], [3, 0]]), dst=torch.tensor([[0, 2], [0, 1]]))
    mixed = cutmix(images, plan)
    assert mixed[0, 0].tolist() == [[0, 0, 5, 6], [0, 0, 9, 10], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert mixed[1, 0].tolist() == [[0, 12, 13, 14], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert images[0].sum() == 0  # the input is not modified


def seeded_plan(*args) -> CutMixPlan:
    """``plan_cutmix`` under seed 1 (it draws from the global RNG), leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return plan_cutmix(*args)


def test_cutmix_boxes_follow_the_configuration() -> None:
    height, width, scale = 40, 50, (0.05, 0.2)
    for same_prob in (0.0, 1.0, 0.5):
        plan = seeded_plan(64, height, width, scale, (0.5, 2.0), same_prob)
        h, w = plan.size.unbind(1)
        area = (h * w).float() / (height * width)
        assert ((area > scale[0] * 0.8) & (area < scale[1] * 1.2)).all()  # up to rounding of h and w
        assert ((w.float() / h) > 0.5 / 1.3).all() and ((w.float() / h) < 2.0 * 1.3).all()
        for corner in (plan.src, plan.dst):
            assert (corner >= 0).all() and (corner[:, 0] + h <= height).all() and (corner[:, 1] + w <= width).all()
        same = plan.source == torch.arange(64)
        if same_prob == 0.0:
            assert not same.any()
        if same_prob == 1.0:
            assert same.all()
        shift = (plan.src - plan.dst).abs()
        assert ((shift[same, 0] * 2 >= h[same]) | (shift[same, 1] * 2 >= w[same])).all()  # never onto itself
        if same_prob == 0.5:
            assert 10 < same.sum() < 54
    again = seeded_plan(64, height, width, scale, (0.5, 2.0), 0.5)
    assert torch.equal(again.size, plan.size) and torch.equal(again.source, plan.source)


def test_nt_xent_two_pairs_by_hand() -> None:
    t, s = 0.5, 1 / math.sqrt(2)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # not unit length: the loss uses cosine similarity
    negative = torch.tensor([[0.0, 2.0]])
    e = lambda x: math.exp(x / t)  # noqa: E731
    # anchors a0=(1,0), a1=(0,1), b0=(1,0), b1=(s,s); positives a0<->b0, a1<->b1; candidates exclude the anchor
    without = [
        -math.log(e(1) / (e(0) + e(1) + e(s))),  # a0: a1, b0+, b1
        -math.log(e(s) / (e(0) + e(0) + e(s))),  # a1: a0, b0, b1+
        -math.log(e(1) / (e(1) + e(0) + e(s))),  # b0: a0+, a1, b1
        -math.log(e(s) / (e(s) + e(s) + e(s))),  # b1: a0, a1+, b0
    ]
    with_negative = [
        -math.log(e(1) / (e(0) + e(1) + e(s) + e(0))),  # ... + c=(0,1)
        -math.log(e(s) / (e(0) + e(0) + e(s) + e(1))),
        -math.log(e(1) / (e(1) + e(0) + e(s) + e(0))),
        -math.log(e(s) / (e(s) + e(s) + e(s) + e(s))),
    ]
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(sum(without) / 4, rel=1e-5)
    assert nt_xent(z1, z2, negative, temperature=t).item() == pytest.approx(sum(with_negative) / 4, rel=1e-5)
    assert with_negative[3] == pytest.approx(math.log(4))


def test_cutmix_contrastive_step_runs_and_learns(tmp_path) -> None:
    objective = CutMixContrastive(resnet18(), hidden_dim=16, projection_dim=8, box_scale=(0.1, 0.3))
    record = train(tmp_path, objective, tiny_dataset(), steps=2)
    rows = [json.loads(line) for line in (tmp_path / "ckpt/cutmix_contrastive/resnet18/run.loss.jsonl").open()]
    assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
    assert rows[1]["l2sp"] > 0 and 0 <= rows[0]["accuracy"] <= 1
    assert record["steps"] == 2 and record["final_loss"] == rows[1]["loss"]


# --------------------------------------------------------------------------- determinism and resume


def test_same_seed_gives_identical_weights(tmp_path) -> None:
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(1000 + seed)  # the global RNG state before the run must not matter
        objective = CutMixContrastive(resnet18(), hidden_dim=16, projection_dim=8)
        train(tmp_path, objective, tiny_dataset(4), name=name, steps=2, seed=seed)
        return snapshot(objective)

    first, second, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_resume_equals_uninterrupted_run(tmp_path) -> None:
    dataset = tiny_dataset(4)  # 2 steps per epoch, 3 steps, a resume file after every step

    def objective() -> CutMixContrastive:
        return CutMixContrastive(resnet18(), hidden_dim=16, projection_dim=8)

    straight = objective()
    train(tmp_path / "straight", straight, dataset, steps=3, checkpoint_every=1)

    interrupted = objective()
    interrupt_at_call(interrupted, 2)  # a Ctrl-C inside step 2
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", interrupted, dataset, steps=3, checkpoint_every=1)
    files = CheckpointFiles.for_run(tmp_path / "resumed" / "ckpt", "cutmix_contrastive", "resnet18", "run")
    assert files.state.is_file() and not files.weights.exists()

    assert load_torch(files.state)["step"] == 1  # resumes mid-epoch, then crosses into epoch 2
    resumed = objective()  # a new process would start from fresh pretrained weights
    train(tmp_path / "resumed", resumed, dataset, steps=3, checkpoint_every=1)
    expected, actual = snapshot(straight), snapshot(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert not files.state.exists()  # removed once the run is complete

    def losses(root: Path) -> list[tuple[int, float]]:
        path = root / "ckpt" / "cutmix_contrastive" / "resnet18" / "run.loss.jsonl"
        return [(row["step"], row["loss"]) for row in map(json.loads, path.read_text().splitlines())]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 3

    again = objective()
    again.loss = None  # a finished run with the same configuration is not trained again
    assert train(tmp_path / "resumed", again, dataset, steps=3, checkpoint_every=1)["steps"] == 3


# --------------------------------------------------------------------------- the checkpoint in PatchCore


def test_checkpoint_loads_into_patchcore(tmp_path) -> None:
    objective = RotationPrediction(resnet18(), hidden_dim=16)
    record = train(tmp_path, objective, tiny_dataset(), name="widget")
    path = str(tmp_path / "ckpt" / "rotation" / "resnet18" / "widget.pt")
    sidecar = json.loads((tmp_path / "ckpt/rotation/resnet18/widget.json").read_text())
    assert sidecar["base_backbone"]["name"] == "resnet18" and sidecar["method"] == "rotation"
    assert {"config", "steps", "final_loss", "date", "sha256"} <= set(sidecar) and sidecar == record

    backbone = FineTunedBackbone(path, method="rotation", base="resnet18", category="widget")
    assert backbone.layers == ["layer2", "layer3"] and backbone.mean == objective.extractor.mean
    images = torch.stack([item["image"] for item in tiny_dataset(3, seed=5)])
    objective.extractor.eval()
    with torch.no_grad():
        for ours, theirs in zip(backbone(images), objective.extractor(images), strict=True):
            assert torch.equal(ours, theirs)

    model = PatchCore(backbone, PatchEmbedder(embed_dim=32), progress=False)
    model.fit(DataLoader(tiny_dataset(4), batch_size=2))
    scores, _ = model.score(images)
    model.save(tmp_path / "model")  # self-contained: its own copy of the fine-tuned weights
    model.save(tmp_path / "spec_only", weights=False)  # names the checkpoint and its SHA-256
    loaded = PatchCore.load(tmp_path / "model", expected_spec=model.spec())
    torch.testing.assert_close(loaded.score(images)[0], scores)

    train(tmp_path, RotationPrediction(resnet18(), hidden_dim=16), tiny_dataset(), name="widget", steps=2)
    with pytest.raises(CheckpointMismatchError, match="fine-tuned again"):  # the checkpoint it names changed
        PatchCore.load(tmp_path / "spec_only")
    torch.testing.assert_close(PatchCore.load(tmp_path / "model").score(images)[0], scores)  # its copy did not


def test_backbone_yaml_and_missing_checkpoint_names_the_make_command(tmp_path) -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    def config(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=list(overrides))

    cfg = config("backbone=rotation", "category=bottle").backbone
    assert cfg.checkpoint == "checkpoints/rotation/effnet_lite0/bottle.pt" and is_finetuned(cfg)
    for alias in ("rotation", "cutmix_contrastive"):  # short names for the generic config, the same node resolved
        generic = config("backbone=finetuned", f"backbone.method={alias}", "category=bottle").backbone
        short = config(f"backbone={alias}", "category=bottle").backbone
        assert OmegaConf.to_container(short, resolve=True) == OmegaConf.to_container(generic, resolve=True) == {
            "_target_": "extensions.checkpoint.FineTunedBackbone", "name": alias, "method": alias,
            "base": "effnet_lite0", "checkpoint": f"checkpoints/{alias}/effnet_lite0/bottle.pt", "category": "bottle"}
    with pytest.raises(MissingCheckpointError, match=r"experiments/finetune.py method=rotation backbone=effnet_lite0 "
                                                     r"dataset=<dataset> category=bottle"):
        FineTunedBackbone(**{k: v for k, v in cfg.items() if k != "_target_"})
    with pytest.raises(MissingCheckpointError,
                       match=r"make finetune METHOD=rotation CATEGORY=bottle BACKBONE=effnet_lite0"):
        per_category_backbones(config("backbone=rotation", "category=bottle"), ["bottle"])  # the harness's check

    cfg = config("backbone=cutmix_contrastive", "backbone.base=resnet18", "category=[grass,brick]",
                 f"backbone.checkpoint={tmp_path}/${{backbone.base}}/${{category}}.pt")
    with pytest.raises(InstantiationException) as raised:  # category=all / a list: one extractor per category
        instantiate(cfg.backbone)
    assert "one checkpoint per category" in str(raised.value.__cause__)
    for category in ("grass", "brick"):  # what experiments/main.py does for per_category backbones
        with pytest.raises(InstantiationException) as raised:
            instantiate(OmegaConf.merge(cfg, {"category": category}).backbone)
        assert isinstance(raised.value.__cause__, MissingCheckpointError)
        assert f"{tmp_path}/resnet18/{category}.pt does not exist" in str(raised.value.__cause__)
        assert (f"experiments/finetune.py method=cutmix_contrastive backbone=resnet18 dataset=<dataset> "
                f"category={category}") in str(raised.value.__cause__)

    # experiments/main.py: per_category_backbones checks every checkpoint before any work
    assert per_category_backbones(config("category=[grass,brick]"), ["grass", "brick"]) is None  # effnet_lite0
    with pytest.raises(MissingCheckpointError) as raised:
        per_category_backbones(cfg, ["grass", "brick"])
    assert "2 fine-tuned checkpoints" in str(raised.value)
    assert "make finetune METHOD=cutmix_contrastive CATEGORY=grass BACKBONE=resnet18" in str(raised.value)
    assert "make finetune METHOD=cutmix_contrastive CATEGORY=brick BACKBONE=resnet18" in str(raised.value)
    (tmp_path / "resnet18").mkdir()
    (tmp_path / "resnet18" / "grass.pt").touch()
    with pytest.raises(MissingCheckpointError, match=r"brick.pt does not exist.*CATEGORY=brick"):
        per_category_backbones(cfg, ["grass", "brick"])
    (tmp_path / "resnet18" / "brick.pt").touch()
    configs = per_category_backbones(cfg, ["grass", "brick"])
    assert {c: (v.checkpoint, v.category) for c, v in configs.items()} == {
        "grass": (f"{tmp_path}/resnet18/grass.pt", "grass"), "brick": (f"{tmp_path}/resnet18/brick.pt", "brick")}


def test_make_targets_pick_the_dataset() -> None:
    def dry_run(*args: str) -> str:
        # --no-print-directory: under `make test` the inherited MAKEFLAGS would add "Entering directory" lines
        command = ["make", "--no-print-directory", "-n", "-f", "Makefile.finetune", "PY=python", "STAMP=", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    assert dry_run("finetune-rotation", "CATEGORY=bottle", "BACKBONE=wrn50") == (
        "python experiments/finetune.py method=rotation backbone=wrn50 dataset=mvtec category=bottle")
    assert dry_run("finetune-cutmix") == (
        "python experiments/finetune.py method=cutmix_contrastive backbone=effnet_lite0 dataset=textures category=all")
    assert dry_run("finetune-rotation", "QUICK=1") == (
        "python experiments/finetune.py method=rotation backbone=effnet_lite0 dataset=textures category=all "
        "method.train.max_steps=4 proxy.eval_every=2")
    assert dry_run("finetune", "METHOD=cutmix_contrastive", "CATEGORY=bottle") == (  # the generic target
        "python experiments/finetune.py method=cutmix_contrastive backbone=effnet_lite0 dataset=mvtec category=bottle")
    unknown = subprocess.run(["make", "--no-print-directory", "-n", "-f", "Makefile.finetune", "PY=python", "STAMP=",
                              "finetune", "METHOD=nope"], cwd=REPO, capture_output=True, text=True)
    assert unknown.returncode != 0 and not unknown.stdout
    assert "METHOD=nope has no conf/method/nope.yaml; the methods are: cutmix_contrastive rotation" in unknown.stderr
    compare = dry_run("finetune-compare", "CATEGORY=brick")  # PatchCore on every method of conf/method/
    assert "for method in cutmix_contrastive rotation; do" in compare
    assert "backbone=finetuned backbone.method=$method backbone.base=effnet_lite0" in compare
    assert dry_run("sweep-finetune", "SWEEP=cutmix", "CATEGORY=brick") == (
        "python experiments/finetune.py -m finetune_sweep=cutmix backbone=effnet_lite0 dataset=textures "
        "category=brick")


# --------------------------------------------------------------------------- end to end


TINY = ("backbone=resnet18", "backbone.pretrained=false", "dataset=folder", "dataset.resize=32",
        "dataset.image_size=32", "method.train.max_steps=2", "method.train.batch_size=2", "num_workers=0",
        "progress=false", "logger=none", "proxy.embed_dim=32")


def test_finetune_then_patchcore_end_to_end(tmp_path, monkeypatch) -> None:
    from core.data import MVTecLayout
    from experiments.harness.finetuning import run as finetune
    from experiments.harness.fit_and_evaluate import run as patchcore

    data = tmp_path / "data"
    write_tiny_category(data, "widget", n_train=4, size=40)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[*TINY, "method=rotation", "method.objective.hidden_dim=8",
                                             f"dataset.root={data}", f"checkpoint_dir={tmp_path / 'ckpt'}"])
    with monkeypatch.context() as patch:  # fine-tuning never looks at a test image
        for name in ("test_samples", "test_set"):
            patch.setattr(MVTecLayout, name, lambda *args, **kwargs: pytest.fail("fine-tuning read test images"))
        records = finetune(cfg)
    record = records["widget"]  # 4 train/good images: 1 held out for the proxy (proxy.holdout=0.2), 3 trained on
    assert set(records) == {"widget"} and record["steps"] == 2 and record["n_train_images"] == 3
    assert record["selection"]["config"]["proxy_nominal"] == 1 and record["selection"]["evaluations"] == 2
    assert (tmp_path / "ckpt" / "rotation" / "resnet18" / "widget.pt").is_file()

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "backbone=rotation", "backbone.base=resnet18",
            f"backbone.checkpoint={tmp_path}/ckpt/rotation/${{backbone.base}}/${{category}}.pt", "dataset=folder",
            f"dataset.root={data}", "dataset.resize=32", "dataset.image_size=32",
            "category=widget", "patchcore.embedder.embed_dim=32", "num_workers=0", "progress=false"])
    results = patchcore(cfg, tmp_path / "run")
    assert results["complete"] and 0 <= results["categories"]["widget"]["image_auroc"] <= 1


def test_finetune_command_line(tmp_path) -> None:
    data = tmp_path / "data"
    write_tiny_category(data, "widget", n_train=3, size=40)
    command = [sys.executable, "experiments/finetune.py", *TINY, "method=cutmix_contrastive",
               "method.objective.hidden_dim=8", f"dataset.root={data}", f"checkpoint_dir={tmp_path / 'ckpt'}",
               f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 steps" in done.stdout
    sidecar = json.loads((tmp_path / "ckpt" / "cutmix_contrastive" / "resnet18" / "widget.json").read_text())
    assert sidecar["config"]["method"]["objective"]["temperature"] == 0.2 and sidecar["n_train_images"] == 2


def test_finetune_refuses_a_fine_tuned_backbone(tmp_path) -> None:
    from experiments.harness.finetuning import run as finetune

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=["backbone=rotation", "dataset=folder", f"dataset.root={tmp_path}"])
    with pytest.raises(ValueError, match="fine-tune a base backbone"):
        finetune(cfg)


def test_a_method_config_is_train_plus_objective_and_errors_name_the_fix() -> None:
    from omegaconf import OmegaConf

    from experiments.harness.finetuning import build_objective, method_parts

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        method = OmegaConf.to_container(compose("finetune", overrides=["method=rotation", "method.train.lr=0.01",
                                                                       "method.objective.hidden_dim=8"]).method)
    train, objective = method_parts(method)
    assert train == TrainConfig(lr=0.01)  # every other shared setting at conf/method/train/default.yaml's default
    assert objective == {"_target_": "extensions.rotation.RotationPrediction", "hidden_dim": 8, "flip": True}
    built = build_objective(objective, resnet18())
    assert isinstance(built, RotationPrediction) and built.head[0].out_features == 8

    with pytest.raises(ValueError, match=r"has no \['train', 'objective'\].*Add a fine-tuning method"):
        method_parts({"name": "old", "_target_": "extensions.rotation.RotationPrediction", "lr": 1e-4})
    with pytest.raises(ValueError, match=r"method.train: .*'temperature'.*go under method.objective"):
        method_parts({"name": "x", "train": {"temperature": 0.1}, "objective": {}})
    with pytest.raises(ValueError, match=r"method.objective._target_='torch.nn.Linear': name a subclass"):
        build_objective({"_target_": "torch.nn.Linear"}, resnet18())
    with pytest.raises(ValueError, match=r"method.objective._target_='extensions.nope.Nope' cannot be imported"):
        build_objective({"_target_": "extensions.nope.Nope"}, resnet18())
