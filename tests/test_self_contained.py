"""Self-contained saved models (issue 16): loading with empty weight caches gives identical scores, the
SHA-256 manifest refuses modified, missing and extra files, the spec-only form names a missing weights
file, a save is whole or absent, and ``save_model`` is checked by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import core.backbones.efficientnet as efficientnet_module
import core.backbones.torchvision_cnn as torchvision_module
import core.model_files as model_files
from core.backbones import EfficientNetLite, TorchvisionCNN, WeightsNotFoundError
from core.data import Preprocessing
from core.features import PatchEmbedder
from core.patchcore import ModelMismatchError, PatchCore
from core.saved_model import SpecOnlyWeightsError


def _images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _loader(images: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images), batch_size=len(images), collate_fn=lambda rows: torch.stack(
        [row[0] for row in rows]))


def _refuse_lookups(monkeypatch) -> list[str]:
    """Every way this code finds pretrained weights fails (and is recorded); the caches point at empty folders."""
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append("lookup")
        raise WeightsNotFoundError("weights looked up (the test forbids it)")

    monkeypatch.setattr(efficientnet_module, "efficientnet_lite0_weights_file", refuse)
    monkeypatch.setattr(torchvision_module, "torchvision_weights_file", refuse)
    return calls


@pytest.fixture(scope="module")
def effnet_model(tmp_path_factory) -> tuple[PatchCore, Path]:
    """EfficientNet-Lite0 with its real ImageNet weights, fitted on 2 images of 64 px and saved."""
    model = PatchCore(EfficientNetLite(), PatchEmbedder(embed_dim=64), progress=False)
    model.fit(_loader(_images(2)))
    model.preprocessing = Preprocessing(resize=64, image_size=64, mean=model.mean, std=model.std)
    saved = model.save(tmp_path_factory.mktemp("effnet") / "model", threshold={"image_threshold": 1.5})
    return model, saved


def test_loads_with_empty_caches_and_no_weight_lookup_identically(effnet_model, tmp_path, monkeypatch) -> None:
    model, saved = effnet_model
    for variable in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    calls = _refuse_lookups(monkeypatch)
    assert sorted(p.name for p in saved.iterdir()) == ["bank.safetensors", "extractor.safetensors", "manifest.json",
                                                       "model.json"]
    loaded = PatchCore.load(saved)
    assert calls == []
    images = _images(3, seed=1)
    (scores, maps), (loaded_scores, loaded_maps) = model.score(images), loaded.score(images)
    assert torch.equal(scores, loaded_scores) and torch.equal(maps, loaded_maps)
    assert loaded.spec() == model.spec()  # the saved spec (pretrained=true), not the weightless rebuild's
    assert loaded.extractor.spec() == model.extractor.spec()
    assert loaded.preprocessing == model.preprocessing and loaded.threshold == {"image_threshold": 1.5}
    assert all(not any(Path(tmp_path / v).iterdir()) for v in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE"))
    record = json.loads((saved / "model.json").read_text())
    assert record["format_version"] == 3 and record["weights"]["extractor"]["kwargs"]["pretrained"] is False
    assert record["versions"]["torch"] == torch.__version__
    # the lookup really is what a spec-only model needs: the same refusal reaches its loader
    spec_only = model.save(tmp_path / "spec_only", weights=False)
    with pytest.raises(SpecOnlyWeightsError, match=r"spec-only .*weights looked up .*save_model=true"):
        PatchCore.load(spec_only)
    assert calls == ["lookup"]


@pytest.fixture
def saved_copy(effnet_model, tmp_path) -> Path:
    return Path(shutil.copytree(effnet_model[1], tmp_path / "copy"))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", ["weights", "bank", "model.json", "missing", "extra", "no manifest",
                                    "bad manifest"])
def test_manifest_refuses_a_tampered_folder(saved_copy, tamper) -> None:
    name = {"weights": "extractor.safetensors", "bank": "bank.safetensors", "model.json": "model.json",
            "missing": "extractor.safetensors", "extra": "notes.txt", "no manifest": "manifest.json",
            "bad manifest": "manifest.json"}[tamper]
    path = saved_copy / name
    if tamper in ("weights", "bank"):
        _flip_a_byte(path)
    elif tamper == "model.json":  # still valid JSON of a valid model: only the manifest can tell
        record = json.loads(path.read_text())
        record["scoring"]["blur_sigma"] = 2.0
        path.write_text(json.dumps(record))
    elif tamper in ("missing", "no manifest"):
        path.unlink()
    elif tamper == "extra":
        path.write_text("a file copied in by mistake")
    else:
        path.write_text(json.dumps({"algorithm": "md5", "files": {}}))
    problem = {"weights": "was modified after the model was saved", "bank": "was modified after the model was saved",
               "model.json": "was modified after the model was saved", "missing": "is missing",
               "extra": "is not part of the saved model", "no manifest": "has no manifest.json",
               "bad manifest": "is not a valid manifest"}[tamper]
    where = saved_copy if tamper == "no manifest" else path
    with pytest.raises(ModelMismatchError, match=rf"saved model {saved_copy} is not valid: {where} {problem}.*"
                                                 r"re-copy the whole folder.*refit it"):
        PatchCore.load(saved_copy)


def test_manifest_lists_every_file_with_its_sha256(effnet_model) -> None:
    import hashlib

    saved = effnet_model[1]
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["algorithm"] == "sha256"
    assert manifest["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in saved.iterdir()
                                 if p.name != "manifest.json"}


def test_weights_that_do_not_fit_are_refused(saved_copy) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved_copy / "extractor.safetensors"))
    del state["stem.0.weight"]
    save_file(state, str(saved_copy / "extractor.safetensors"))
    model_files.write_manifest(saved_copy)  # re-sealed: the weights' own check is reached
    with pytest.raises(ModelMismatchError, match=r"extractor weights .*extractor\.safetensors do not fit the "
                                                 r"network core\.backbones\.EfficientNetLite .*refit it"):
        PatchCore.load(saved_copy)


# --------------------------------------------------------------------------- spec-only and older folders


@pytest.fixture
def resnet_with_weights_file(tmp_path) -> tuple[PatchCore, Path]:
    """resnet18 whose weights come from a file (backbone.weights_path), fitted on 2 images of 32 px."""
    weights = tmp_path / "resnet18.pth"
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), weights)
    model = PatchCore(TorchvisionCNN("resnet18", ["layer2"], weights_path=str(weights)), PatchEmbedder(embed_dim=16),
                      progress=False)
    model.fit(_loader(_images(2, size=32)))
    return model, weights


def test_spec_only_model_names_its_missing_weights_file(resnet_with_weights_file, tmp_path) -> None:
    model, weights = resnet_with_weights_file
    saved = model.save(tmp_path / "spec_only", weights=False)
    assert sorted(p.name for p in saved.iterdir()) == ["bank.safetensors", "manifest.json", "model.json"]
    assert json.loads((saved / "model.json").read_text())["weights"] is None
    images = _images(2, size=32, seed=3)
    assert torch.equal(PatchCore.load(saved).score(images)[0], model.score(images)[0])  # weights found: same
    weights.unlink()
    with pytest.raises(SpecOnlyWeightsError, match=rf"{saved} is spec-only .*backbone\.weights_path={weights} does "
                                                   r"not exist.*save_model=true") as raised:
        PatchCore.load(saved)
    assert isinstance(raised.value, FileNotFoundError)  # predict.py reports it as one line


def test_format_1_folder_is_refused_with_refit(tmp_path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.json").write_text(json.dumps({"format_version": 1}))
    torch.save({"features": torch.zeros(2, 4)}, tmp_path / "old" / "bank.pt")
    with pytest.raises(ModelMismatchError, match=r"earlier version of this code \(format 1: bank\.pt.*refit it"):
        PatchCore.load(tmp_path / "old")
    with pytest.raises(FileNotFoundError, match=r"is not a saved PatchCore model \(it has no model\.json\)"):
        PatchCore.load(tmp_path)


# --------------------------------------------------------------------------- whole or absent


def test_an_interrupted_save_keeps_the_earlier_model(resnet_with_weights_file, tmp_path, monkeypatch) -> None:
    model, _ = resnet_with_weights_file
    saved = model.save(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    original, written = model_files.write_tensors, []

    def fail_second(path, tensors):
        written.append(path.name)
        if len(written) == 2:
            raise OSError("disk full")
        return original(path, tensors)

    monkeypatch.setattr("core.patchcore.write_tensors", fail_second)
    with pytest.raises(OSError, match="disk full"):
        model.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # the earlier model, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "resnet18.pth"]  # no temporary folder left
    PatchCore.load(saved)


def test_saving_over_a_folder_that_is_no_model_is_refused(resnet_with_weights_file, tmp_path) -> None:
    model, _ = resnet_with_weights_file
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"photos exists and is not a saved model .*choose another folder"):
        model.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.png").read_bytes() == b"x"


# --------------------------------------------------------------------------- the save_model setting


TINY = ("dataset=folder", "dataset.resize=32", "dataset.image_size=32", "backbone=resnet18",
        "backbone.pretrained=false", "backbone.layers=[layer2]", "patchcore.embedder.embed_dim=16", "coreset.ratio=0.5",
        "logger=none", "viz.n=0", "category=widget")


def test_save_model_spec_only_through_the_harness_and_bad_values(tmp_path, make_config) -> None:
    from experiments.harness.fit_and_evaluate import run
    from tests.conftest import write_tiny_category

    write_tiny_category(tmp_path / "data", "widget", size=32)
    config = make_config(*TINY, f"dataset.root={tmp_path / 'data'}", "save_model=spec_only")
    run(config, tmp_path / "run")
    saved = tmp_path / "run" / "models" / "widget"
    assert not (saved / "extractor.safetensors").exists()
    loaded = PatchCore.load(saved)
    assert loaded.preprocessing == Preprocessing(resize=32, image_size=32)  # recorded by the fit itself
    with pytest.raises(ValueError, match=r"save_model='yes': choose true .*spec_only .*or false"):
        run(make_config(*TINY, f"dataset.root={tmp_path / 'data'}", "save_model=yes"), tmp_path / "run2")
    assert not (tmp_path / "run2" / "results.json").exists()


def test_fine_tuned_backbone_is_saved_with_its_weights_and_loads_without_its_checkpoint(tmp_path) -> None:
    """A wrapper extractor (a fine-tuning checkpoint around resnet18) saves its base network's weights: the
    loaded model needs neither the checkpoint file nor any weights cache, and scores identically."""
    from extensions.checkpoint import FORMAT_VERSION, FineTunedBackbone

    base = TorchvisionCNN("resnet18", ["layer2"], pretrained=False)
    state = {name: value + 0.01 for name, value in base.state_dict().items()}  # "fine-tuned": not the random init
    checkpoint = tmp_path / "widget.pt"
    torch.save({"format_version": FORMAT_VERSION, "method": "rotation", "category": "widget", "step": 3,
                "base": {"name": "resnet18", **base.spec()}, "state_dict": state}, checkpoint)
    model = PatchCore(FineTunedBackbone(str(checkpoint), method="rotation", base="resnet18", category="widget"),
                      PatchEmbedder(embed_dim=16), progress=False)
    model.fit(_loader(_images(2, size=32)))
    saved = model.save(tmp_path / "model")
    checkpoint.unlink()
    loaded = PatchCore.load(saved)
    images = _images(2, size=32, seed=4)
    assert torch.equal(loaded.score(images)[0], model.score(images)[0])
    assert loaded.spec() == model.spec()  # still names the checkpoint and its SHA-256
    assert json.loads((saved / "model.json").read_text())["weights"]["extractor"]["target"] == \
        "core.backbones.TorchvisionCNN"
