"""Checkpoint selection without test labels (extensions/proxy.py, synthetic.py, monitors.py): the monitors by
hand and against a direct SVD, synthetic masks exactly the changed pixels, the proxy never reading test/,
step 0 kept when training only hurts, early stopping, resume bit-identical with evaluations in the loop,
the W&B adapter, and the default base backbone shared by finetune.py and backbone=rotation."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import core.data.dataset
import extensions.synthetic
from core.backbones import EfficientNetLite, TorchvisionCNN
from core.data import DatasetError, MVTecLayout, Preprocessing
from experiments.harness.finetune_tracking import FinetuneTracking
from experiments.harness.finetuning import datasets, method_names
from extensions.checkpoint import CheckpointFiles, FineTunedBackbone, load_torch
from extensions.cutmix_contrastive import CutMixContrastive
from extensions.monitors import CollapseWarning, distance_spread, effective_rank
from extensions.protection import Protection
from extensions.proxy import ProxyConfig, Selection, split_holdout
from extensions.rotation import RotationPrediction
from extensions.synthetic import PASTE_KINDS, SYNTHETIC_KINDS, make_synthetic, paste_box
from extensions.training import TrainConfig, fine_tune
from tests.conftest import CONF_DIR, interrupt_at_call, write_tiny_category

REPO = Path(__file__).resolve().parents[1]


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def resnet18() -> TorchvisionCNN:
    return TorchvisionCNN("resnet18", ["layer2", "layer3"], pretrained=False, name="resnet18")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# --------------------------------------------------------------------------- monitors


def direct_effective_rank(x: np.ndarray) -> float:
    """The definition, computed independently: numpy SVD of the centred matrix, entropy of s / sum(s)."""
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_equals_a_direct_svd_and_hand_values() -> None:
    rng = np.random.default_rng(0)
    for shape in ((200, 12), (6, 20)):  # more patches than dims (Gram path) and fewer (SVD path)
        x = rng.normal(size=shape) * np.linspace(0.1, 3, shape[1])  # unequal spread per column
        assert effective_rank(torch.from_numpy(x).float()) == pytest.approx(direct_effective_rank(x), rel=1e-5)
    # [e1, -e1, e2, -e2, e3, -e3]: mean 0, three equal singular values sqrt(2): rank exactly 3
    axes = np.eye(3, 5)
    assert effective_rank(torch.from_numpy(np.concatenate([axes, -axes]))) == pytest.approx(3.0, abs=1e-9)
    line = np.arange(10.0)[:, None] * np.array([[1.0, 2.0, -1.0]]) + 5  # rank one after centring
    assert effective_rank(torch.from_numpy(line)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.ones(4, 3)) == 1.0  # all rows equal
    with pytest.raises(ValueError, match="N >= 2"):
        effective_rank(torch.ones(1, 3))


def test_distance_spread_and_weight_distance_by_hand() -> None:
    spread = distance_spread(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert spread["nn_distance_mean"] == 2.5 and spread["nn_distance_std"] == pytest.approx(math.sqrt(1.25))
    assert spread["nn_distance_cv"] == pytest.approx(math.sqrt(1.25) / 2.5)

    extractor = resnet18()
    protection = Protection(extractor, frozen_stages=1)
    # relative to ||w0|| over every extractor parameter, frozen ones included (arms training different stages compare)
    norm0 = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in extractor.parameters()))
    assert norm0 > math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in protection.parameters()))
    assert protection.weight_distance() == {"weight_distance": 0.0, "weight_distance_rel": 0.0}
    weight = extractor.get_parameter("body.layer2.0.conv1.weight")
    with torch.no_grad():
        weight += 0.1
        extractor.body.conv1.weight += 5.0  # frozen: not counted
    moved = protection.weight_distance()
    assert moved["weight_distance"] == pytest.approx(0.1 * math.sqrt(weight.numel()), rel=1e-5)
    assert moved["weight_distance_rel"] == pytest.approx(moved["weight_distance"] / norm0, rel=1e-6)


# --------------------------------------------------------------------------- held-out split and synthetic set


def test_holdout_split_is_seeded_and_disjoint(tmp_path) -> None:
    write_tiny_category(tmp_path, "widget", n_train=40, size=8)
    samples = MVTecLayout("folder", tmp_path).train_samples("widget")
    train, held = split_holdout(samples, 0.2, seed=0)
    assert len(held) == 8 and len(train) == 32 and set(train) | set(held) == set(samples)
    assert not set(train) & set(held)
    assert split_holdout(samples, 0.2, seed=0) == (train, held)
    assert split_holdout(samples, 0.2, seed=1)[1] != held
    assert len(split_holdout(samples[:3], 0.2, seed=0)[1]) == 1  # at least one image is held out
    with pytest.raises(ValueError, match="proxy.enabled=false"):
        split_holdout(samples[:1], 0.2, seed=0)


def test_holdout_and_bank_caps_keep_the_proxy_cost_flat(tmp_path) -> None:
    from extensions.proxy import bank_indices

    write_tiny_category(tmp_path, "widget", n_train=60, size=8)
    samples = MVTecLayout("folder", tmp_path).train_samples("widget")
    train, held = split_holdout(samples, 0.2, seed=0, cap=5)
    assert len(held) == 5 and len(train) == 55
    assert set(held) <= set(samples) and not set(train) & set(held)
    assert len(split_holdout(samples, 0.2, seed=0, cap=None)[1]) == 12  # no cap: the fraction
    picked = bank_indices(55, 10, seed=0)
    assert len(picked) == 10 == len(set(picked)) and picked == sorted(picked) and max(picked) < 55
    assert picked == bank_indices(55, 10, seed=0) and bank_indices(8, 10, seed=0) == list(range(8))
    with pytest.raises(ValueError, match="proxy.max_bank_images=0"):
        ProxyConfig(max_bank_images=0)


def test_paste_box_by_hand() -> None:
    rng = np.random.default_rng(3)
    source = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # every box unique
    area = 0.03 * 256**2
    patch, (y, x) = paste_box(source, area, rng, avoid_self=True)
    h, w = patch.shape[:2]
    assert 16 <= y and y + h <= 240 and 16 <= x and x + w <= 240  # inside the border (1/16 of the side)
    assert 0.8 * area <= h * w <= 1.2 * area
    found = [(sy, sx) for sy in range(256 - h + 1) for sx in range(256 - w + 1)
             if source[sy, sx, 0] == patch[0, 0, 0] and np.array_equal(source[sy : sy + h, sx : sx + w], patch)]
    assert len(found) == 1  # a verbatim copy of one box of the source
    assert all(abs(sy - y) * 2 >= h or abs(sx - x) * 2 >= w for sy, sx in found)  # at least half a box away


@pytest.mark.parametrize("resize,crop", [(64, 64), (80, 64)])
def test_synthetic_masks_are_exactly_the_changed_pixels(tmp_path, resize, crop) -> None:
    write_tiny_category(tmp_path, "widget", n_train=3, size=96)
    samples = MVTecLayout("folder", tmp_path).train_samples("widget")
    preprocessing = Preprocessing(resize, crop)
    made = make_synthetic(samples, preprocessing, seed=0)
    assert made.nominal.shape == (3, crop, crop, 3) and made.anomalies.shape == (12, crop, crop, 3)
    assert made.kinds == list(SYNTHETIC_KINDS) * 3 and made.sources == [i for i in range(3) for _ in SYNTHETIC_KINDS]
    for anomaly, mask, source in zip(made.anomalies, made.masks, made.sources, strict=True):
        changed = (anomaly != made.nominal[source]).any(dim=-1)
        assert mask.any() and torch.equal(changed, mask)
    for i, kind in enumerate(made.kinds):  # the pasted kinds are boxes
        if kind in PASTE_KINDS:
            ys, xs = torch.nonzero(made.masks[i], as_tuple=True)
            assert made.masks[i].sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    nominal = preprocessing.image(core.data.read_image(samples[0].path))  # the crop is the image PatchCore sees
    torch.testing.assert_close(made.normalised(made.nominal[:1], preprocessing.mean, preprocessing.std)[0], nominal,
                               atol=1e-5, rtol=0)
    again = make_synthetic(samples, preprocessing, seed=0)
    assert torch.equal(again.anomalies, made.anomalies) and torch.equal(again.masks, made.masks)
    assert not torch.equal(make_synthetic(samples, preprocessing, seed=1).anomalies, made.anomalies)


# --------------------------------------------------------------------------- the proxy never reads test/


def test_proxy_never_reads_the_test_folder(tmp_path, monkeypatch) -> None:
    from experiments.harness.finetuning import run as finetune

    data = tmp_path / "data"
    category = write_tiny_category(data, "widget", n_train=5, size=40)
    for folder in ("test", "ground_truth"):  # sabotage: every test image and mask is garbage
        for path in (category / folder).rglob("*.png"):
            path.write_bytes(b"not an image")
    (category / "test" / "good" / "unreadable.png").mkdir()  # a folder where an image should be
    read: list[Path] = []

    def reading(path):
        read.append(Path(path))
        if "train" not in Path(path).parts:
            pytest.fail(f"fine-tuning read {path}")
        return real_read(path)

    real_read = core.data.dataset.read_image
    monkeypatch.setattr(core.data.dataset, "read_image", reading)
    monkeypatch.setattr(extensions.synthetic, "read_image", reading)
    for name in ("test_samples", "test_set"):
        monkeypatch.setattr(MVTecLayout, name, lambda *args, **kwargs: pytest.fail("fine-tuning listed test images"))
    cfg = compose_config("finetune", "backbone=resnet18", "backbone.pretrained=false", "dataset=folder",
                         f"dataset.root={data}", "dataset.resize=32", "dataset.image_size=32", "method=rotation",
                         "method.objective.hidden_dim=8", "method.train.max_steps=2", "method.train.batch_size=2",
                         "num_workers=0", "progress=false", "logger=none", "proxy.embed_dim=16", "proxy.eval_every=1",
                         f"checkpoint_dir={tmp_path / 'ckpt'}")
    record = finetune(cfg)["widget"]
    assert record["selection"]["evaluations"] == 3 and record["selection"]["config"]["proxy_anomalies"] == 4
    assert record["selection"]["anomalies"] == extensions.synthetic.describe(list(SYNTHETIC_KINDS))  # recorded
    assert read and {p.parent for p in read} == {category / "train" / "good"}
    monkeypatch.undo()
    with pytest.raises(DatasetError):  # the sabotage is real: the test set cannot be read
        MVTecLayout("folder", data).test_set("widget", Preprocessing(32, 32))[0]


# --------------------------------------------------------------------------- selection


def tiny_proxy(tmp_path: Path, extractor, size: int = 32, **proxy) -> tuple:
    """(training dataset, validator) from a tiny folder category, as experiments/harness/finetuning.py builds them."""
    write_tiny_category(tmp_path / "data", "widget", n_train=6, size=size + 8)
    layout = MVTecLayout("folder", tmp_path / "data", resize=size, image_size=size)
    preprocessing = layout.preprocessing(extractor.mean, extractor.std)
    config = ProxyConfig(**{"eval_every": 1, "patience": 10, "embed_dim": 32, "holdout": 0.34, **proxy})
    return datasets(layout, "widget", preprocessing, config, 0, extractor, "cpu")


def train(root: Path, objective, dataset, proxy, steps: int, checkpoint_every: int = 50, **overrides) -> dict:
    config = TrainConfig(**{"max_steps": steps, "batch_size": 2, "lr": 1e-3, **overrides})
    files = CheckpointFiles.for_run(root / "ckpt", objective.name, objective.extractor.name, "widget")
    identity = {"method": objective.name, "category": "widget", "base": objective.extractor.spec(), "config": {}}
    return fine_tune(objective, dataset, config, files, identity, progress=False, checkpoint_every=checkpoint_every,
                     proxy=proxy)


def test_absurd_learning_rate_selects_step_0_and_warns_of_collapse(tmp_path) -> None:
    pretrained = snapshot(EfficientNetLite(pretrained=True))
    extractor = EfficientNetLite(pretrained=True)  # real features: the proxy must find the pretrained ones best
    dataset, proxy = tiny_proxy(tmp_path, extractor, size=64)
    objective = RotationPrediction(extractor, hidden_dim=16)
    with pytest.warns(CollapseWarning, match="effective rank"):
        record = train(tmp_path, objective, dataset, proxy, steps=2, lr=10.0, head_lr=10.0, frozen_stages=-1,
                       l2sp_weight=0.0)
    rows = [json.loads(line) for line in (tmp_path / "ckpt/rotation/effnet_lite0/widget.proxy.jsonl").open()]
    assert [row["step"] for row in rows] == [0, 1, 2] and rows[0]["weight_distance"] == 0.0
    assert all(row["score"] is None or row["score"] < rows[0]["score"] for row in rows[1:])
    assert rows[1]["effective_rank"] < 0.5 * rows[0]["effective_rank"] and rows[1]["collapse_warning"]
    assert record["selected_step"] == 0 and record["steps"] == 2
    selection = record["selection"]
    assert selection["collapse_warnings"] == [1, 2] and selection["proxy"]["score"] == rows[0]["score"]
    assert selection["monitors"]["effective_rank"] == rows[0]["effective_rank"]
    saved = load_torch(tmp_path / "ckpt/rotation/effnet_lite0/widget.pt")
    assert saved["step"] == 0 and same_weights(saved["state_dict"], pretrained)  # exactly the pretrained weights
    loaded = FineTunedBackbone(str(tmp_path / "ckpt/rotation/effnet_lite0/widget.pt"), method="rotation")
    assert loaded.steps == 0


class ScriptedProxy:
    """A validator whose scores are given per step; it keeps the weights it was shown."""

    def __init__(self, scores: dict[int, float], patience: int) -> None:
        self.config = ProxyConfig(eval_every=1, patience=patience)
        self.scores, self.seen = scores, {}

    def sizes(self) -> dict:
        return {}

    def evaluate(self, extractor, step: int) -> dict:
        self.seen[step] = snapshot(extractor)
        score = self.scores[step]
        return {"step": step, "score": score, "image_auroc": score, "pixel_auroc": score, "effective_rank": 10.0,
                "eval_time_s": 0.0}


def tensors(n: int = 4, size: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(3, size, size, generator=generator)} for _ in range(n)]


def test_early_stop_keeps_the_best_step_and_ties_keep_the_earlier(tmp_path) -> None:
    proxy = ScriptedProxy({0: 0.5, 1: 0.7, 2: 0.7, 3: 0.6, 4: 0.9}, patience=2)
    objective = RotationPrediction(resnet18(), hidden_dim=8)
    record = train(tmp_path, objective, tensors(), proxy, steps=10)
    assert record["steps"] == 3 and record["selected_step"] == 1  # stopped after 2 evaluations without gain
    assert record["stop_reason"].startswith("early stop at step 3") and set(proxy.seen) == {0, 1, 2, 3}
    saved = load_torch(tmp_path / "ckpt/rotation/resnet18/widget.pt")
    assert saved["step"] == 1 and same_weights(saved["state_dict"], proxy.seen[1])
    assert not same_weights(proxy.seen[1], proxy.seen[3])


def test_patience_null_runs_the_whole_length_and_still_selects(tmp_path) -> None:
    """The training-length curve's setting: the same scores that stop a patience-2 run at step 3 run to step 6
    with patience null, and selection still returns the best evaluation (step 5), not the last."""
    proxy = ScriptedProxy({0: 0.5, 1: 0.7, 2: 0.7, 3: 0.6, 4: 0.65, 5: 0.9, 6: 0.8}, patience=None)
    objective = RotationPrediction(resnet18(), hidden_dim=8)
    record = train(tmp_path, objective, tensors(), proxy, steps=6)
    assert record["steps"] == 6 and record["selected_step"] == 5 and record["stop_reason"] is None
    assert set(proxy.seen) == set(range(7))


def test_a_diverging_run_ends_with_the_selected_weights(tmp_path) -> None:
    proxy = ScriptedProxy({0: 0.5, 1: 0.6, 2: 0.55}, patience=5)
    objective = RotationPrediction(resnet18(), hidden_dim=8)
    real_loss, calls = objective.loss, {"n": 0}

    def nan_at_step_3(images):
        calls["n"] += 1
        loss, stats = real_loss(images)
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    objective.loss = nan_at_step_3
    record = train(tmp_path, objective, tensors(), proxy, steps=5)
    assert record["stop_reason"].startswith("diverged at step 3") and record["steps"] == 2
    assert record["selected_step"] == 1
    assert same_weights(load_torch(tmp_path / "ckpt/rotation/resnet18/widget.pt")["state_dict"], proxy.seen[1])


def test_selection_state_round_trips() -> None:
    selection = Selection(patience=2, collapse_fraction=0.5)
    extractor = torch.nn.Linear(2, 2)
    selection.update({"step": 0, "score": 0.4, "effective_rank": 8.0}, extractor)
    with pytest.warns(CollapseWarning):
        selection.update({"step": 5, "score": 0.3, "effective_rank": 3.0}, extractor)
    other = Selection(patience=2, collapse_fraction=0.5)
    other.load_state_dict(selection.state_dict())
    assert other.rows == selection.rows and other.best["step"] == 0 and other.since_best == 1
    assert other.summary()["collapse_warnings"] == [5] and not other.exhausted


# --------------------------------------------------------------------------- resume with evaluations in the loop


def test_resume_is_bit_identical_with_evaluations_in_the_loop(tmp_path) -> None:
    def objective() -> CutMixContrastive:
        return CutMixContrastive(resnet18(), hidden_dim=16, projection_dim=8)

    def logs(root: Path, name: str) -> list[dict]:
        rows = [json.loads(line) for line in (root / f"ckpt/cutmix_contrastive/resnet18/widget.{name}.jsonl").open()]
        return [{k: v for k, v in row.items() if k not in ("eval_time_s", "time_s")} for row in rows]

    straight = objective()
    dataset, proxy = tiny_proxy(tmp_path / "data_straight", straight.extractor)
    expected = train(tmp_path / "straight", straight, dataset, proxy, steps=2, checkpoint_every=1)

    interrupted = objective()
    dataset, proxy = tiny_proxy(tmp_path / "data_resumed", interrupted.extractor)
    interrupt_at_call(interrupted, 2)  # a Ctrl-C inside step 2
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", interrupted, dataset, proxy, steps=2, checkpoint_every=1)
    state = load_torch(tmp_path / "resumed/ckpt/cutmix_contrastive/resnet18/widget.resume.pt")
    assert state["step"] == 1 and [row["step"] for row in state["selection"]["rows"]] == [0, 1]

    resumed = objective()  # a new process: fresh weights, the validator built again from the files
    dataset, proxy = tiny_proxy(tmp_path / "data_resumed2", resumed.extractor)
    record = train(tmp_path / "resumed", resumed, dataset, proxy, steps=2, checkpoint_every=1)
    assert same_weights(snapshot(straight), snapshot(resumed))
    assert logs(tmp_path / "resumed", "loss") == logs(tmp_path / "straight", "loss")
    assert logs(tmp_path / "resumed", "proxy") == logs(tmp_path / "straight", "proxy")
    assert [row["step"] for row in logs(tmp_path / "straight", "proxy")] == [0, 1, 2]
    assert record["selected_step"] == expected["selected_step"] and record["selection"] == {
        **expected["selection"], "eval_time_s": record["selection"]["eval_time_s"]}
    assert set(record["selection"]) >= {"selected_step", "proxy", "monitors", "start", "evaluations",
                                        "collapse_warnings", "config", "eval_time_s", "proxy_log"}
    assert set(record["selection"]["monitors"]) == {"effective_rank", "nn_distance_mean", "nn_distance_std",
                                                    "nn_distance_cv", "weight_distance", "weight_distance_rel"}


# --------------------------------------------------------------------------- tracking


class FakeRun:
    def __init__(self) -> None:
        self.logged, self.metrics, self.summary, self.tags, self.exit_code = [], [], {}, ("textures",), None

    def log(self, data: dict) -> None:
        self.logged.append(data)

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.metrics.append((name, step_metric))

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


def test_tracking_logs_steps_evaluations_and_the_selection() -> None:
    tracker = type("Tracker", (), {"run": FakeRun(), "disabled": False})()
    run = tracker.run
    tracking = FinetuneTracking(tracker)
    tracking.log_step("brick", {"step": 1, "loss": 1.5, "accuracy": 0.25, "epoch": 0})
    tracking.log_eval("brick", {"step": 0, "score": 0.9, "image_auroc": 0.8, "collapse_warning": False,
                                "pixel_auroc": None})
    tracking.log_selected("brick", {"selected_step": 0, "steps": 10, "stop_reason": None, "selection": {
        "proxy": {"score": 0.9, "image_auroc": 0.8}, "monitors": {"effective_rank": 12.5}}})
    tracking.finish(True)
    assert run.logged == [{"brick/step": 1, "brick/train/loss": 1.5, "brick/train/accuracy": 0.25,
                           "brick/train/epoch": 0},
                          {"brick/step": 0, "brick/proxy/score": 0.9, "brick/proxy/image_auroc": 0.8}]
    assert ("brick/*", "brick/step") in run.metrics
    assert run.summary == {"brick/selected_step": 0, "brick/steps": 10, "brick/proxy_score": 0.9,
                           "brick/proxy_image_auroc": 0.8, "brick/effective_rank": 12.5}
    assert run.exit_code == 0 and tracker.run is None

    broken = type("Tracker", (), {"run": FakeRun(), "disabled": False})()
    broken.run.log = lambda data: 1 / 0
    with pytest.warns(RuntimeWarning, match="W&B logging stopped"):
        FinetuneTracking(broken).log_step("brick", {"step": 1, "loss": 1.0})
    assert broken.disabled  # and nothing else is tried


@pytest.mark.slow
def test_finetune_command_line_writes_an_offline_wandb_run(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    import os

    env = {**os.environ, "WANDB_SILENT": "true"}
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        env.pop(name, None)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(tmp_path / "wandb_home" / name.lower())
    write_tiny_category(tmp_path / "data", "widget", n_train=4, size=40)
    command = [str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python",
               "experiments/finetune.py", "backbone=resnet18", "backbone.pretrained=false", "dataset=folder",
               f"dataset.root={tmp_path / 'data'}", "dataset.resize=32", "dataset.image_size=32",
               "method.train.max_steps=2", "method.train.batch_size=2", "method.objective.hidden_dim=8",
               "num_workers=0", "progress=false",
               "proxy.embed_dim=16", f"checkpoint_dir={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "selected step" in done.stdout
    folders = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and list(folders[0].glob("run-*.wandb"))


# --------------------------------------------------------------------------- the default base backbone


def test_the_default_base_is_the_same_for_finetune_and_patchcore() -> None:
    finetuned = compose_config("finetune").backbone.name
    assert compose_config("config", "backbone=rotation").backbone.base == finetuned
    assert compose_config("config", "backbone=cutmix_contrastive").backbone.base == finetuned
    command = ["make", "--no-print-directory", "-n", "-f", "Makefile.finetune", "PY=python", "STAMP=",
               "finetune-rotation"]
    made = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"backbone={finetuned} " in made


def test_sweep_presets_compose_and_write_per_job_checkpoints(monkeypatch) -> None:
    monkeypatch.delenv("FINETUNE_COMPARE_DIR", raising=False)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for preset, method, swept in (
                ("rotation", "rotation", {"method.train.lr", "method.train.l2sp_weight"}),
                ("cutmix", "cutmix_contrastive", {"method.train.lr", "method.objective.temperature",
                                                  "method.objective.same_image_prob"})):
            cfg = compose("finetune", overrides=[f"finetune_sweep={preset}"], return_hydra_config=True)
            assert cfg.method.name == method and set(cfg.hydra.sweeper.params) == swept
            assert cfg._get_node("checkpoint_dir")._value() == "${hydra:runtime.output_dir}/checkpoints"
        cfg = compose("finetune", overrides=["finetune_sweep=seeds", "method.train.seed=2"], return_hydra_config=True)
        assert dict(cfg.hydra.sweeper.params) == {"method": "glob(*)", "method.train.seed": "0,1,2"}
        # glob(*): Hydra's sweeper expands it to every conf/method/<name>.yaml (not the train/ subgroup)
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.utils import create_config_search_path
        from hydra.core.override_parser.overrides_parser import OverridesParser

        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONF_DIR))
        parser = OverridesParser.create(config_loader=loader)
        swept = parser.parse_overrides([f"method={cfg.hydra.sweeper.params.method}"])
        assert list(swept[0].sweep_string_iterator()) == method_names() == ["cutmix_contrastive", "rotation"]
        assert cfg.checkpoint_dir == "outputs/finetune_compare/seed2"


def test_readme_commands_work_as_written_on_a_fresh_clone(tmp_path, monkeypatch, textures_root) -> None:
    """`make finetune-rotation QUICK=1 && python experiments/main.py backbone=rotation`, with nothing but the
    data's root, size and a tiny schedule overridden: the default checkpoint paths must meet."""
    from experiments.harness.finetuning import run as finetune
    from experiments.harness.fit_and_evaluate import run as patchcore

    monkeypatch.chdir(tmp_path)  # checkpoints/ relative to the working directory, as in a fresh clone
    data = (f"dataset.root={textures_root}", "dataset.categories=[brick]", "dataset.resize=64",
            "dataset.image_size=64", "num_workers=0", "progress=false", "logger=none")
    records = finetune(compose_config("finetune", "method=rotation", *data, "method.train.max_steps=1",
                                      "method.objective.hidden_dim=8", "proxy.eval_every=1", "proxy.embed_dim=32"))
    assert records["brick"]["selection"]["config"]["proxy_nominal"] == 20  # 0.2 of the 100 training images
    assert (tmp_path / "checkpoints/rotation/effnet_lite0/brick.pt").is_file()
    results = patchcore(compose_config("config", "backbone=rotation", *data, "patchcore.embedder.embed_dim=32",
                                       "viz.n=0"), tmp_path / "run")
    assert results["complete"] and 0.5 < results["categories"]["brick"]["image_auroc"] <= 1
