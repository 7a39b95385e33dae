"""Hostile exported folders and non-finite scores (issue 26, deliverables 1 and 2): every key of export.json is
checked at load (manifest re-hashed after each edit, as an attacker would), the graph file must be the
format's own inside the folder, and a NaN or infinite score or pixel is decided anomalous, never nominal, by
the graph (in torch and ONNX Runtime) and by ``ExportedModel.run``."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.backbones import TorchvisionCNN
from core.data import Preprocessing
from core.export import ExportablePatchCore, ExportedModel, ExportedModelError, export_model
from core.features import PatchEmbedder
from core.model_files import ModelFilesError, write_manifest, write_tensors
from core.scoring import ScoringHead
from experiments.benchmarks.export_bench import random_bank_model
from tests.test_hostile_load import edit, setter, within

THRESHOLD = {"image_threshold": 5.0, "pixel_threshold": 4.0, "min_defect_area": 0}


@pytest.fixture(scope="module")
def model():
    """A random-bank PatchCore (resnet18 layer2, 32 px, 64-d) with preprocessing and both thresholds."""
    model = random_bank_model(300, 64, 32, TorchvisionCNN("resnet18", ["layer2"], pretrained=False),
                              PatchEmbedder(64))
    model.preprocessing = Preprocessing(resize=32, image_size=32, mean=model.mean, std=model.std)
    model.threshold = dict(THRESHOLD)
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    return export_model(model, tmp_path_factory.mktemp("export") / "onnx", "onnx", chunk=128, input_dtype="float32")


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "onnx"))


# --------------------------------------------------------------------------- 1. NaN never reads as nominal


def test_the_decision_rule_calls_non_finite_values_anomalous() -> None:
    values = torch.tensor([math.nan, math.inf, -math.inf, 1.0, 1.5, 2.0])
    assert ScoringHead.anomalous(values, 1.5).tolist() == [True, True, True, False, True, True]


def test_a_nan_crop_is_anomalous_in_torch_and_onnx(model, exported) -> None:
    """Today: score NaN, decision False, an empty mask. Now: decision True and every pixel of the mask set."""
    crops = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    crops[1, :, 5:9, 5:9] = math.nan
    graph = ExportablePatchCore(model, chunk=128, input_dtype="float32", thresholds=(5.0, 4.0)).eval()
    with torch.no_grad():
        scores, maps, decisions, masks = graph(crops)
    assert math.isnan(scores[1]) and not bool(torch.isfinite(maps[1]).any())
    assert bool(decisions[1]) and bool(masks[1].all())
    assert bool(decisions[0]) == bool(scores[0] >= 5.0)  # a finite score: score >= threshold, as before
    assert torch.equal(masks[0], maps[0] >= 4.0)
    outputs = ExportedModel(exported).run(crops.numpy())
    assert np.isnan(outputs["image_scores"][1]) and outputs["image_decisions"][1]
    assert outputs["anomaly_masks"][1].all() and outputs["anomaly_masks"].shape == (2, 32, 32)
    assert outputs["image_decisions"][0] == (outputs["image_scores"][0] >= 5.0)


def test_run_overrides_a_graph_that_would_call_nan_nominal(exported) -> None:
    """A graph exported before the rule (``score >= t``: False for NaN) is corrected by ``run`` itself."""
    model = ExportedModel(exported, threads=1)  # the whole batch in one runner call
    model._runner = lambda batch: [np.array([math.nan, 1.0], np.float32), np.full((2, 32, 32), math.nan, np.float32),
                                np.array([False, False]), np.zeros((2, 32, 32), bool)]
    outputs = model.run(np.zeros((2, 3, 32, 32), np.float32))
    assert outputs["image_decisions"].tolist() == [True, False] and outputs["anomaly_masks"].all()


def test_predict_images_refuses_nan_scores_instead_of_deciding(model, exported, monkeypatch) -> None:
    image = np.full((32, 32, 3), 128, np.uint8)
    monkeypatch.setattr(type(model), "score", lambda self, images: (torch.full((len(images),), math.nan),
                                                                    torch.zeros(len(images), 32, 32)))
    with pytest.raises(ValueError, match=r"image scores of inputs \[0\] are NaN or infinite"):
        model.predict_images([image])
    runtime = ExportedModel(exported)
    runtime._runner = lambda batch: [np.full(len(batch), math.inf, np.float32), np.zeros((len(batch), 32, 32),
                                  np.float32), np.ones(len(batch), bool), np.zeros((len(batch), 32, 32), bool)]
    with pytest.raises(ValueError, match=r"image scores of inputs \[0\] are NaN or infinite"):
        runtime.predict_images([image])


def test_a_non_finite_threshold_is_not_exported(model, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"threshold\.image_threshold=nan must be a finite number"):
        ExportablePatchCore(model, thresholds=(math.nan, None))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 2. export.json checked by key


@pytest.mark.parametrize(("change", "message"), [
    (setter("file", "/etc/passwd"), r"file='/etc/passwd' must be the graph file, a plain name inside the folder"),
    (setter("file", "../onnx/model.onnx"), r"file='\.\./onnx/model\.onnx' must be the graph file"),
    (setter("file", "sub/model.onnx"), r"file='sub/model\.onnx' must be the graph file"),
    (setter("file", "model.xml"), r"file='model\.xml' but a onnx export's graph is 'model\.onnx'"),
    (lambda record: record.pop("file"), r"the key 'file' is missing"),
    (setter("outputs", ["anomaly_maps", "image_scores", "image_decisions", "anomaly_masks"]),
     r"outputs=.* must be the graph's output names in its order"),
    (setter("outputs", ["image_scores", "anomaly_maps"]), r"outputs=.* but threshold=.* makes the graph return "
                                                          r"\['image_scores', 'anomaly_maps', 'image_decisions', "
                                                          r"'anomaly_masks'\]"),
    (setter("threshold.image_threshold", math.nan), r"threshold\.image_threshold=nan must be a finite number or null"),
    (setter("threshold.pixel_threshold", math.inf), r"threshold\.pixel_threshold=inf must be a finite number"),
    (setter("threshold.min_defect_area", -2), r"threshold\.min_defect_area=-2 must be an integer >= 0"),
    (setter("input.shape", ["batch", 3, 100000, 32]), r"input=.* must be an object .*H, W integers in \[1, 4096\]"),
    (setter("input.dtype", "int8"), r"input=.* must be an object"),
    (setter("input.range", "0-255"), r"input=.* must be an object"),  # a float32 input's range is 0-1
    (setter("preprocessing.image_size", 24), r"preprocessing\.image_size=24 but the model was fitted on 32x32 "
                                             r"crops"),
    (setter("preprocessing.std", [1.0, 0.0, 1.0]), r"preprocessing\.std=\[1\.0, 0\.0, 1\.0\] must be three finite "
                                                    r"numbers > 0"),
    (setter("preprocessing.resize", 10**6), r"preprocessing\.resize=1000000 must be an integer in \[1, 4096\]"),
    (setter("chunk", "128"), r"chunk='128' must be a positive integer"),
    (setter("format", "tensorrt"), r"format='tensorrt' must be one of"),
    (setter("format_version", 2), r"format_version=2 but this code reads version 1"),
    (setter("seconds", math.nan), r"seconds=nan must be a finite number >= 0"),
    (setter("surprise", 1), r"unknown keys \['surprise'\]"),
    (lambda record: record.pop("threshold"), r"the key 'threshold' is missing"),
    # the fast form's node (issue 29 item 3): fixed file names, the precision with its drift record, the settings
    (setter("fast.file", "../onnx/features.onnx"), r"fast=.* must be an object \{\"file\": one of"),
    (setter("fast.file", "features.xml"), r"fast\.file='features\.xml' but a onnx export's feature graph is "
                                          r"'features\.onnx'"),
    (setter("fast.bank", "/etc/passwd"), r"fast=.* must be an object"),
    (setter("fast.precision", "int8"), r"fast=.* must be an object .*'int8_drift\.json' with int8"),
    (setter("fast.search.backend", "annoy"), r"its scoring or search settings are refused \(search\.backend="
                                             r"'annoy'"),
    (setter("fast.search.nprobe", 0), r"its scoring or search settings are refused \(search\.nprobe=0"),
    (setter("model.scoring.blur_sigma", -1.0), r"its scoring or search settings are refused "
                                              r"\(patchcore\.scoring\.blur_sigma=-1\.0"),
])
def test_export_json_is_checked_by_key(export_copy, change, message) -> None:
    edit(export_copy, change)
    with pytest.raises(ExportedModelError, match=rf"{export_copy / 'export.json'} is not valid: {message}.*export "
                                                 rf"the model again"):
        ExportedModel(export_copy)


def test_the_graph_file_cannot_come_from_elsewhere(export_copy, tmp_path) -> None:
    """An absolute ``file`` is refused by the schema (above); a listed graph that links outside is refused by
    the manifest, by name, before it is read, and so is a link to a device (which would be read forever)."""
    data = export_copy / "model.onnx.data"
    shutil.move(data, tmp_path / "elsewhere.data")
    os.symlink(tmp_path / "elsewhere.data", data)  # the same bytes: the digest would match
    with pytest.raises(ModelFilesError, match=rf"{data} is a symbolic link, not a regular file"):
        ExportedModel(export_copy)
    data.unlink()
    os.symlink("/dev/zero", data)
    with within(10), pytest.raises(ModelFilesError, match=rf"{data} is a symbolic link, not a regular file"):
        ExportedModel(export_copy)


@pytest.mark.parametrize("name", ["features.onnx", "features.onnx.data", "bank.safetensors"])
def test_a_modified_fast_form_file_is_refused(export_copy, name) -> None:
    """The fast form's files are listed in the manifest like the graph's: a changed byte is refused by name."""
    with open(export_copy / name, "r+b") as handle:
        handle.seek(max(0, (export_copy / name).stat().st_size // 2))
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelFilesError, match=rf"{export_copy / name} was modified"):
        ExportedModel(export_copy)


@pytest.mark.parametrize(("features", "message"), [
    (torch.full((300, 64), math.nan), r"memory bank .*bank\.safetensors has 300 rows with NaN or infinite values"),
    (torch.zeros(299, 64), r"bank\.safetensors holds \(299, 64\) features, export\.json says bank_size x "
                           r"embed_dim = \(300, 64\)"),
    (torch.zeros(300, 63), r"holds \(300, 63\) features"),
])
def test_a_rehashed_hostile_bank_is_refused(export_copy, features, message) -> None:
    """A bank replaced and the manifest re-hashed (as an attacker would): read as a saved model's bank (finite,
    safetensors, no pickle) and of the shape export.json records; the graph form does not read it."""
    write_tensors(export_copy / "bank.safetensors", {"features": features})
    write_manifest(export_copy)
    with pytest.raises(ModelFilesError, match=message):
        ExportedModel(export_copy)
    assert ExportedModel(export_copy, form="graph").form == "graph"


def test_an_untampered_export_still_loads_and_converts(exported, tmp_path) -> None:
    record = json.loads((exported / "export.json").read_text())
    assert record["outputs"] == ["image_scores", "anomaly_maps", "image_decisions", "anomaly_masks"]
    assert ExportedModel(exported).threshold == THRESHOLD
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["sizes"] == {p.name: p.stat().st_size for p in exported.iterdir() if p.name != "manifest.json"}


def test_openvino_conversion_reads_the_source_through_the_gate(export_copy, tmp_path) -> None:
    from core.export import onnx_to_openvino

    edit(export_copy, setter("file", "../../model.onnx"))
    with pytest.raises(ExportedModelError, match=r"file='\.\./\.\./model\.onnx' must be the graph file"):
        onnx_to_openvino(export_copy, tmp_path / "openvino")
    assert not (tmp_path / "openvino").exists()
