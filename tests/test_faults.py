"""The hostile-input and fault probe of issue 17, kept as tests: one (or a few) per finding, each asserting
what must happen (the file is not created, the message names the file or setting and the fix, exit codes)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.backbones import TorchvisionCNN
from core.features import PatchEmbedder
from core.patchcore import ModelMismatchError, PatchCore

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- saved models (finding 1, 4, 6)


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory) -> Path:
    """A tiny saved PatchCore model (random resnet18 weights, 32 px): fitted once for the module."""
    extractor = TorchvisionCNN("resnet18", ["layer2"], pretrained=False)
    model = PatchCore(extractor, PatchEmbedder(embed_dim=16), progress=False)
    model.fit(DataLoader(TensorDataset(_images(2)), batch_size=2, collate_fn=lambda rows: torch.stack([r[0] for r in rows])))
    return model.save(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture
def saved(fitted_model, tmp_path) -> Path:
    """A private copy of the saved model, for a test to tamper with."""
    return Path(shutil.copytree(fitted_model, tmp_path / "model"))


def _edit_record(model_dir: Path, **changes) -> None:
    record = json.loads((model_dir / "model.json").read_text())
    record.update(changes)
    (model_dir / "model.json").write_text(json.dumps(record))


def test_saved_model_round_trip_still_loads(saved) -> None:
    loaded = PatchCore.load(saved)
    assert len(loaded.bank) == json.loads((saved / "model.json").read_text())["bank_size"]


def test_file_writing_extractor_target_is_refused_and_writes_nothing(saved, tmp_path) -> None:
    victim = tmp_path / "pwned.txt"
    _edit_record(saved, extractor={"target": "core.io.write_text_atomic", "kwargs": {"path": str(victim), "text": "x"}})
    with pytest.raises(ModelMismatchError, match=r"is not valid.*core\.io\.write_text_atomic.*refit it"):
        PatchCore.load(saved)
    assert not victim.exists()


def test_file_writing_checkpoint_base_is_refused_and_writes_nothing(tmp_path) -> None:
    from extensions.checkpoint import FORMAT_VERSION, CheckpointMismatchError, FineTunedBackbone

    victim = tmp_path / "pwned.txt"
    checkpoint = tmp_path / "widget.pt"
    torch.save({"format_version": FORMAT_VERSION, "method": "rotation", "category": "widget", "step": 1,
                "base": {"name": "resnet18", "target": "core.io.write_text_atomic",
                         "kwargs": {"path": str(victim), "text": "x"}}, "state_dict": {}}, checkpoint)
    with pytest.raises(ValueError, match=r"core\.io\.write_text_atomic"):
        FineTunedBackbone(str(checkpoint), method="rotation", base="resnet18", category="widget")
    assert not victim.exists()
    torch.save({"format_version": FORMAT_VERSION, "method": "rotation", "base": {"name": "resnet18"},
                "state_dict": {}}, checkpoint)  # keys missing: refused by the schema, before any build
    with pytest.raises(CheckpointMismatchError, match=r"widget\.pt is not valid: base must be.*fine-tune again"):
        FineTunedBackbone(str(checkpoint), method="rotation", base="resnet18", category="widget")


@pytest.mark.parametrize(("change", "what"), [
    ({"format_version": "1"}, r"format_version='1' must be an integer"),
    ({"format_version": 99}, r"format_version=99 but this code reads version 1"),
    ({"num_neighbors": "three"}, r"num_neighbors='three' must be an integer >= 1"),
    ({"blur_sigma": -1}, r"blur_sigma=-1 must be a number >= 0"),
    ({"grid": [4]}, r"grid=\[4\] must be"),
    ({"surprise": 1}, r"unknown keys \['surprise'\]"),
    ({"search": {"backend": "exact", "turbo": True}}, r"unknown search settings \['turbo'\]"),
    ({"extractor": "resnet18"}, r"extractor='resnet18' must be an object"),
])
def test_model_json_is_checked_against_its_schema(saved, change, what) -> None:
    _edit_record(saved, **change)
    with pytest.raises(ModelMismatchError, match=rf"model .*model\.json is not valid: {what}.*; refit it"):
        PatchCore.load(saved)


def test_missing_key_and_invalid_json_name_the_file(saved) -> None:
    record = json.loads((saved / "model.json").read_text())
    del record["embedder"]
    (saved / "model.json").write_text(json.dumps(record))
    with pytest.raises(ModelMismatchError, match=r"model\.json is not valid: the key 'embedder' is missing; refit"):
        PatchCore.load(saved)
    (saved / "model.json").write_text("{not json")
    with pytest.raises(ModelMismatchError, match=rf"{saved / 'model.json'} is not valid JSON"):
        PatchCore.load(saved)


@pytest.mark.parametrize("damage", ["empty", "truncated", "keyless", "pickle", "nan", "size"])
def test_damaged_bank_gives_a_clear_message(saved, tmp_path, damage) -> None:
    bank = saved / "bank.pt"
    victim = tmp_path / "ran.txt"
    if damage == "empty":
        bank.write_bytes(b"")
    elif damage == "truncated":
        bank.write_bytes(bank.read_bytes()[:200])
    elif damage == "keyless":
        torch.save({"rows": torch.zeros(3, 16)}, bank)
    elif damage == "pickle":
        class Payload:
            def __reduce__(self):
                return (Path.write_text, (victim, "x"))
        bank.write_bytes(pickle.dumps({"features": Payload()}))
    elif damage == "nan":
        torch.save({"features": torch.full((8, 16), float("nan"))}, bank)
    else:
        torch.save({"features": torch.zeros(len(PatchCore.load(saved).bank) + 2, 16)}, bank)
    expected = {"empty": "missing or empty", "truncated": "cannot be read", "keyless": "no non-empty",
                "pickle": "objects other than tensors", "nan": "8 rows with NaN", "size": "bank_size="}[damage]
    with pytest.raises(ModelMismatchError, match=rf"saved model {saved} is not valid: .*{expected}.*refit it") as raised:
        PatchCore.load(saved)
    assert "weights_only" not in str(raised.value)  # never torch's advice to unpickle untrusted code
    assert not victim.exists()


def test_non_finite_scores_are_an_error_not_a_decision(saved, tmp_path, monkeypatch) -> None:
    from PIL import Image

    from experiments.runs.scoring import predict

    metadata = {"preprocessing": {"resize": 32, "image_size": 32}, "threshold": {"image_threshold": 1.0}}
    _edit_record(saved, metadata=metadata)
    Image.new("RGB", (32, 32)).save(tmp_path / "part.png")
    monkeypatch.setattr(PatchCore, "score", lambda self, images: (torch.full((len(images),), float("nan")),
                                                                 torch.zeros(len(images), 32, 32)))
    with pytest.raises(ValueError, match=r"1 of 1 image scores of .*part\.png are NaN or infinite"):
        predict(saved, str(tmp_path / "part.png"), tmp_path / "preds", progress=False)
    assert not (tmp_path / "preds" / "predictions.csv").exists()  # no 'nominal' row was written


# --------------------------------------------------------------------------- mixed mask availability (finding 2)

TINY = ("dataset=folder", "dataset.resize=32", "dataset.image_size=32", "backbone=resnet18",
        "backbone.pretrained=false", "backbone.layers=[layer2]", "patchcore.embed_dim=16", "coreset.ratio=0.5",
        "logger=none", "viz.n=0")


def tiny_config(make_config, root: Path, *extra: str):
    return make_config(*TINY, f"dataset.root={root}", "category=widget", *extra)


def test_one_missing_mask_keeps_pixel_metrics_for_the_others(tmp_path, make_config) -> None:
    from experiments.main import run
    from tests.conftest import write_tiny_category

    base = write_tiny_category(tmp_path / "data", "widget", n_bad=3, size=32)
    (base / "ground_truth" / "spot" / "001_mask.png").unlink()
    with pytest.warns(UserWarning, match="1 of 3 images"):
        results = run(tiny_config(make_config, tmp_path / "data"), tmp_path / "run")
    assert results["failed"] == {} and results["complete"] is True
    entry = results["categories"]["widget"]
    assert entry["n_test"] == 5 and entry["image_auroc"] is not None  # image metrics over all 5
    assert entry["pixel_auroc"] is not None and entry["aupro"] is not None  # over the 4 with masks
    assert entry["pixel_metrics_note"] == ("pixel metrics over the 4 of 5 test images with masks; 1 defect images "
                                           "without a mask left out: spot (1 of 3)")


def test_maskless_defect_type_next_to_a_masked_one(tmp_path, make_config) -> None:
    from PIL import Image

    from experiments.main import run
    from tests.conftest import write_tiny_category

    base = write_tiny_category(tmp_path / "data", "widget", size=32)
    (base / "test" / "crack").mkdir()
    for i in range(2):
        shutil.copy(base / "test" / "spot" / f"{i:03d}.png", base / "test" / "crack" / f"{i:03d}.png")
    assert Image.open(base / "test" / "crack" / "000.png").size == (32, 32)
    with pytest.warns(UserWarning, match="crack"):
        results = run(tiny_config(make_config, tmp_path / "data", "threshold=f1_optimal"), tmp_path / "run")
    entry = results["categories"]["widget"]
    assert entry["n_test"] == 6 and entry["pixel_auroc"] is not None
    assert "crack (2 of 2)" in entry["pixel_metrics_note"] and "spot" not in entry["pixel_metrics_note"]
    assert sum(entry["threshold"]["confusion"].values()) == 6  # decisions over every test image
