"""Hostile saved-model folders (issue 26, deliverables 1-4): every value of model.json is checked at load,
every listed file must be a plain file inside the folder, the CAE passes the same gate as PatchCore.

Each tampered folder is made here, and its manifest re-hashed as an attacker would (``write_manifest`` after
the edit), so the checksum passes and the schema and range checks must catch it. Each refusal is also shown to
come before the memory bank (or the CAE's weights) is hashed: ``hashed`` records what was."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core import model_files
from core.backbones import TorchvisionCNN
from core.cae import CAE
from core.data import Preprocessing
from core.detector import load_detector
from core.features import PatchEmbedder
from core.model_files import ModelFilesError, write_manifest
from core.patchcore import ModelMismatchError, PatchCore

THRESHOLD = {"rule": "nominal_sigma", "image_threshold": 2.0, "pixel_threshold": 1.5, "min_defect_area": 4}


@contextmanager
def within(seconds: int):
    """Fail instead of hanging (today a link to /dev/zero is hashed forever)."""
    def expire(signum, frame):
        raise TimeoutError(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A tiny saved PatchCore (random resnet18, 32 px crops, 16-d features) with preprocessing and thresholds."""
    model = PatchCore(TorchvisionCNN("resnet18", ["layer2"], pretrained=False), PatchEmbedder(embed_dim=16),
                      progress=False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stack = lambda rows: torch.stack([row[0] for row in rows])  # noqa: E731 - bare image batches
    model.fit(DataLoader(TensorDataset(images), batch_size=2, collate_fn=stack))
    model.preprocessing = Preprocessing(resize=32, image_size=32, mean=model.mean, std=model.std)
    return model.save(tmp_path_factory.mktemp("patchcore") / "model", threshold=THRESHOLD,
                      metadata={"threshold": THRESHOLD, "preprocessing": {"resize": 32, "image_size": 32}})


@pytest.fixture
def saved(fitted, tmp_path) -> Path:
    return Path(shutil.copytree(fitted, tmp_path / "model"))


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files whose SHA-256 the load computed, in order."""
    names: list[str] = []
    real = model_files._check_digest

    def recording(path, expected, size):
        names.append(Path(path).name)
        return real(path, expected, size)

    monkeypatch.setattr(model_files, "_check_digest", recording)
    return names


def edit(folder: Path, change) -> None:
    """Apply ``change(record)`` to model.json (or export.json) and re-hash the manifest, as an attacker would."""
    name = "model.json" if (folder / "model.json").exists() else "export.json"
    record = json.loads((folder / name).read_text())
    change(record)
    (folder / name).write_text(json.dumps(record))  # NaN and Infinity are written as JSON's NaN / Infinity
    write_manifest(folder)


def setter(path: str, value):
    """``change(record)`` setting the dotted ``path`` to ``value``."""
    def change(record: dict) -> None:
        *parents, last = path.split(".")
        node = record
        for key in parents:
            node = node[key]
        node[last] = value
    return change


# --------------------------------------------------------------------------- 1. non-finite thresholds


@pytest.mark.parametrize("node", ["threshold", "metadata.threshold"])
@pytest.mark.parametrize(("key", "value", "message"), [
    ("image_threshold", math.nan, r"image_threshold=nan must be a finite number or null"),
    ("image_threshold", math.inf, r"image_threshold=inf must be a finite number or null"),
    ("pixel_threshold", -math.inf, r"pixel_threshold=-inf must be a finite number or null"),
    ("image_threshold", "2.0", r"image_threshold='2\.0' must be a finite number or null"),
    ("min_defect_area", -1, r"min_defect_area=-1 must be an integer >= 0"),
    ("min_defect_area", 2.5, r"min_defect_area=2\.5 must be an integer >= 0"),
    ("min_defect_area", math.nan, r"min_defect_area=nan must be an integer >= 0"),
])
def test_a_non_finite_threshold_is_refused_with_its_key(saved, hashed, node, key, value, message) -> None:
    edit(saved, setter(f"{node}.{key}", value))
    with pytest.raises(ModelMismatchError, match=rf"model.json is not valid: {node}\.{message}.*refit it"):
        PatchCore.load(saved)
    assert hashed == ["model.json"]  # refused before the bank was hashed


def test_the_saved_thresholds_still_load(saved) -> None:
    model = PatchCore.load(saved)
    assert model.threshold == THRESHOLD and model.metadata["threshold"] == THRESHOLD
    assert model.preprocessing == Preprocessing(32, 32, model.mean, model.std)


# --------------------------------------------------------------------------- 2. files that are not plain files


def _bank_digest(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["files"]["bank.safetensors"]


@pytest.mark.parametrize(("replace", "kind"), [
    (lambda bank, outside: os.symlink("/dev/zero", bank), "a symbolic link"),
    (lambda bank, outside: os.mkfifo(bank), "a FIFO"),
    (lambda bank, outside: bank.mkdir(), "a folder"),
    # the same bytes, but outside the folder: the digest matches, the link is still refused
    (lambda bank, outside: os.symlink(outside, bank), "a symbolic link"),
])
def test_a_listed_file_that_is_no_plain_file_is_refused_by_name(saved, tmp_path, hashed, replace, kind) -> None:
    bank = saved / "bank.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(bank, outside)
    replace(bank, outside)
    with within(10):
        with pytest.raises(ModelMismatchError, match=rf"{bank} is {kind}, not a regular file: a saved model's files "
                                                     r"are plain files inside its folder.*refit it"):
            PatchCore.load(saved)
    assert hashed == []  # refused before anything was hashed


def test_a_manifest_or_record_that_is_no_plain_file_is_refused(saved, tmp_path) -> None:
    (saved / "manifest.json").unlink()
    os.symlink("/dev/zero", saved / "manifest.json")
    with within(10), pytest.raises(ModelMismatchError, match=r"manifest\.json is a symbolic link, not a regular file"):
        PatchCore.load(saved)
    (saved / "manifest.json").unlink()
    write_manifest(saved)
    shutil.move(saved / "model.json", tmp_path / "model.json")
    os.mkfifo(saved / "model.json")  # the dispatch reads model.json's kind first: it must not block either
    with within(10), pytest.raises(ModelMismatchError, match=r"model\.json is a FIFO, not a regular file"):
        load_detector(saved)


def test_sizes_are_recorded_and_checked_before_hashing(saved, hashed) -> None:
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["sizes"] == {path.name: path.stat().st_size for path in saved.iterdir()
                                 if path.name != "manifest.json"}
    bank = saved / "bank.safetensors"
    bank.write_bytes(bank.read_bytes() + b"\0" * 7)  # not re-hashed: the size tells, before the digest
    with pytest.raises(ModelMismatchError, match=rf"{bank} was modified after the model was saved "
                                                 rf"\({manifest['sizes']['bank.safetensors'] + 7} bytes, the manifest"
                                                 rf"\.json says {manifest['sizes']['bank.safetensors']}\)"):
        PatchCore.load(saved)
    assert hashed == []


def test_a_manifest_without_sizes_still_loads(saved) -> None:
    manifest = json.loads((saved / "manifest.json").read_text())
    del manifest["sizes"]
    (saved / "manifest.json").write_text(json.dumps(manifest))
    assert len(PatchCore.load(saved).bank) == json.loads((saved / "model.json").read_text())["bank_size"]
    bank = saved / "bank.safetensors"
    shutil.move(bank, saved.parent / "bank.out")
    os.symlink(saved.parent / "bank.out", bank)  # without sizes, links are refused all the same
    with pytest.raises(ModelMismatchError, match="is a symbolic link, not a regular file"):
        PatchCore.load(saved)


# --------------------------------------------------------------------------- 4. numbers checked for range at load


@pytest.mark.parametrize(("change", "message"), [
    (setter("scoring.num_neighbors", 0), r"patchcore\.scoring\.num_neighbors=0 must be an integer >= 1"),
    (setter("scoring.num_neighbors", 10**6), r"scoring\.num_neighbors=1000000 but the bank holds bank_size=\d+ "
                                             r"rows: it must be at most \d+"),
    (setter("scoring.blur_sigma", 1e12), r"patchcore\.scoring\.blur_sigma=1000000000000\.0 must be >= 0 "
                                         r"\(0 = no smoothing\) and at most 1024"),
    (setter("scoring.blur_sigma", math.nan), r"patchcore\.scoring\.blur_sigma=nan must be a finite number"),
    (setter("input_size", [100000, 100000]), r"input_size=\[100000, 100000\] must be \[\] or \[H, W\] \(integers "
                                             r"in \[1, 4096\] pixels\)"),
    (setter("input_size", [0, 32]), r"input_size=\[0, 32\] must be"),
    (setter("grid", [64, 64]), r"grid=\[64, 64\] is finer than input_size=\[32, 32\]"),
    (setter("preprocessing.resize", 100000), r"preprocessing\.resize=100000 must be an integer in \[1, 4096\]"),
    (setter("preprocessing.image_size", 16), r"preprocessing\.image_size=16 but the model was fitted on 32x32 crops "
                                             r"\(input_size=\[32, 32\]\): it must equal input_size"),
    (setter("preprocessing.image_size", 64), r"preprocessing: dataset\.image_size=64 must be between 1 and "
                                             r"dataset\.resize=32"),
    (setter("preprocessing.std", [0.0, 1.0, 1.0]), r"preprocessing\.std=\[0\.0, 1\.0, 1\.0\] must be three finite "
                                                    r"numbers > 0"),
    (setter("preprocessing.mean", [math.nan, 0.5, 0.5]), r"preprocessing\.mean=\[nan, 0\.5, 0\.5\] must be three "
                                                         r"finite numbers"),
    (setter("preprocessing.mean", [0.5, 0.5]), r"preprocessing\.mean=\[0\.5, 0\.5\] must be three finite numbers"),
    (setter("preprocessing.turbo", True), r"preprocessing=.* must be null or an object with keys among"),
    (setter("metadata.preprocessing.resize", -5), r"metadata\.preprocessing\.resize=-5 must be an integer in"),
    (setter("search.nlist", 0), r"search\.nlist=0 must be positive"),
    (setter("embedder.embed_dim", 10**9), r"embedder=.* must be an object \{\"embed_dim\": int in \[1, 65536\] "
                                          r"or null"),
    (setter("embedder.patch_size", 10**6), r"embedder=.*\"patch_size\": int in \[1, 255\]"),
])
def test_numbers_out_of_range_are_refused_at_load(saved, hashed, change, message) -> None:
    edit(saved, change)
    with pytest.raises(ModelMismatchError, match=rf"model {saved / 'model.json'} is not valid: {message}.*; refit it"):
        PatchCore.load(saved)
    assert hashed == ["model.json"]  # before the bank was hashed or read, before the extractor was built


# --------------------------------------------------------------------------- 3. the CAE through the same gate


@pytest.fixture(scope="module")
def cae_saved(tmp_path_factory) -> Path:
    model = CAE(image_size=32, latent_dim=8, epochs=1, batch_size=2, progress=False)
    model.fit(DataLoader([{"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))}
                          for i in range(2)], batch_size=2))
    return model.save(tmp_path_factory.mktemp("cae") / "cae", threshold={"image_threshold": 0.5},
                      metadata={"category": "toy", "preprocessing": {"resize": 32, "image_size": 32}})


@pytest.fixture
def cae(cae_saved, tmp_path) -> Path:
    return Path(shutil.copytree(cae_saved, tmp_path / "cae"))


def test_cae_saves_like_patchcore_and_loads_back(cae) -> None:
    record = json.loads((cae / "model.json").read_text())
    assert sorted(path.name for path in cae.iterdir()) == ["cae.safetensors", "manifest.json", "model.json"]
    assert record["format_version"] == 2 and record["model"] == "cae"
    assert set(record["settings"]) == {"image_size", "latent_dim", "loss", "epochs", "batch_size", "lr",
                                       "weight_decay", "ssim_window", "blur_sigma", "seed"}
    first = load_detector(cae)
    assert isinstance(first, CAE) and first.threshold == {"image_threshold": 0.5}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first.score(images)[0], CAE.load(cae).score(images)[0])
    assert first.loss_log == record["loss_log"] and len(first.loss_log) == 1


@pytest.mark.parametrize(("change", "message"), [
    (setter("settings.lr", math.nan), r"settings: cae\.lr=nan must be a finite number > 0"),
    (setter("settings.image_size", 100000), r"settings: cae\.image_size=100000 must be an integer in \[32, 1024\]"),
    (setter("settings.latent_dim", "8"), r"settings: cae\.latent_dim='8' must be an integer"),
    (setter("settings.blur_sigma", -1), r"settings: cae\.blur_sigma=-1 must be in \[0, 1024"),
    (setter("settings.ssim_window", 4), r"settings: cae\.ssim_window=4 must be odd"),
    (setter("settings.device", "cuda"), r"settings=.* must be an object with exactly the keys \['batch_size'"),
    (lambda record: record["settings"].pop("seed"), r"settings=.* must be an object with exactly the keys"),
    (setter("loss_log", [0.5, math.nan]), r"loss_log=\[0\.5, nan\] must be a list of finite numbers"),
    (setter("threshold", {"image_threshold": math.nan}), r"threshold\.image_threshold=nan must be a finite number"),
    (setter("metadata.threshold", {"min_defect_area": -3}), r"metadata\.threshold\.min_defect_area=-3 must be"),
    (setter("metadata.preprocessing", {"std": [1, 1, 0]}), r"metadata\.preprocessing\.std=\[1, 1, 0\] must be "
                                                            r"three finite numbers > 0"),
    (setter("format_version", 1), r"it was written by an earlier version of this code \(format_version=1\), "
                                   r"which this version \(format 2\) does not read"),
    (lambda record: record.pop("loss_log"), r"the key 'loss_log' is missing"),
])
def test_cae_model_json_is_checked_before_the_weights(cae, hashed, change, message) -> None:
    edit(cae, change)
    with pytest.raises(ModelFilesError, match=rf"model {cae / 'model.json'} is not valid: {message}.*; refit it"):
        load_detector(cae)
    assert hashed == ["model.json"]


def test_old_cae_folder_with_a_pickle_is_refused_without_unpickling(cae, tmp_path, monkeypatch) -> None:
    victim = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (victim, "x"))

    for name in ("cae.safetensors", "manifest.json"):
        (cae / name).unlink()
    torch.save({"weight": Payload()}, cae / "cae.pt")  # the old format: a pickle, no manifest
    (cae / "model.json").write_text(json.dumps({"model": "cae", "settings": {"image_size": 32}}))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a saved model")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ModelFilesError, match=r"cae\.pt: pickled weights, no manifest\), which this version does "
                                              r"not read; refit it") as raised:
        load_detector(cae)
    assert "weights_only" not in str(raised.value) and not victim.exists()


def test_a_cae_folder_without_manifest_or_with_foreign_weights_is_refused(cae) -> None:
    (cae / "manifest.json").unlink()
    with pytest.raises(ModelFilesError, match=r"has no manifest\.json.*refit it"):
        load_detector(cae)
    from safetensors.torch import save_file

    save_file({"encoder.0.weight": torch.zeros(2, 2)}, cae / "cae.safetensors")
    write_manifest(cae)
    with pytest.raises(ModelFilesError, match=r"CAE weights .*cae\.safetensors do not fit the network.*refit it"):
        load_detector(cae)


def test_naming_another_kind_does_not_skip_the_gate(saved, cae) -> None:
    """model.json's ``model`` only picks the loader; that loader's gate checks the folder."""
    edit(saved, setter("model", "cae"))  # a PatchCore folder claiming to be a CAE
    with pytest.raises(ModelFilesError, match=r"model\.json is not valid: unknown keys \['bank_size'"):
        load_detector(saved)
    edit(cae, setter("model", "patchcore"))  # and the other way round
    with pytest.raises(ModelMismatchError, match=r"model\.json is not valid: it was written by an earlier version "
                                                 r"of this code \(format_version=2\)"):
        load_detector(cae)


def test_a_loader_refuses_the_other_kind_by_name(saved, cae) -> None:
    with pytest.raises(ModelFilesError, match=r"model\.json is not valid: model='patchcore': it is not a CAE model"):
        CAE.load(saved)
    with pytest.raises(ModelMismatchError, match=r"model\.json is not valid: model='cae': it is not a PatchCore"):
        PatchCore.load(cae)


def test_predict_loads_through_the_gate(cae, tmp_path) -> None:
    from experiments.harness.prediction import load_model

    assert isinstance(load_model(cae, torch.device("cpu")), CAE)
    edit(cae, setter("threshold", {"image_threshold": math.inf}))
    with pytest.raises(ModelFilesError, match=r"threshold\.image_threshold=inf must be a finite number"):
        load_model(cae, torch.device("cpu"))
