"""Issue 29 items 4 and 5: the INT8 feature graph (ONNX Runtime static quantization calibrated on nominal
training images) and its drift record; the exported runtimes' threads (the PyTorch path's rule, core.threads);
choosing the form of an export.

The drift record is checked against an independent computation: the float32 and INT8 fast forms run here on
the held-out images the seeded split names, the relative changes recomputed with numpy.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.api import normalize, prepare_images_uint8
from core.backbones import TorchvisionCNN
from core.data import Preprocessing, TexturesLayout
from core.export import ExportedModel, ExportedModelError, export_model, onnx_to_openvino
from core.export.quantize import Calibration
from core.features import PatchEmbedder
from core.model_files import ModelFilesError, write_manifest
from core.threads import PIECE, in_pieces, pipelined
from experiments import export as export_cli
from experiments.benchmarks.export_bench import random_bank_model

SIZE = 32


def _model():
    model = random_bank_model(300, 64, SIZE, TorchvisionCNN("resnet18", ["layer2"], pretrained=False),
                              PatchEmbedder(64))
    model.preprocessing = Preprocessing(resize=SIZE, image_size=SIZE, mean=model.mean, std=model.std)
    return model


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    model, images = _model(), _images(12)
    calibration = Calibration(images, count=8, heldout=4, seed=3)
    out = export_model(model, tmp_path_factory.mktemp("int8") / "onnx", "onnx", chunk=128, precision="int8",
                       calibration=calibration)
    return model, calibration, out


def test_int8_export_writes_its_drift_record(int8, tmp_path) -> None:
    model, calibration, out = int8
    drift = json.loads((out / "int8_drift.json").read_text())
    assert set(drift) == {"precision", "library", "version", "method", "measured_with", "relative_to",
                          "calibration_images", "heldout_images", "seed", "patch_scores", "image_scores", "maps"}
    assert (drift["library"], drift["calibration_images"], drift["heldout_images"]) == ("onnxruntime", 8, 4)
    record = json.loads((out / "export.json").read_text())
    assert record["fast"]["precision"] == "int8" and record["fast"]["drift"] == "int8_drift.json"
    assert "int8_drift.json" in json.loads((out / "manifest.json").read_text())["files"]
    # recomputed: the held-out crops of the seeded split through the float32 export and the INT8 one
    _, heldout = calibration.split()
    assert len(heldout) == 4 and not any(any(h is c for c in calibration.split()[0]) for h in heldout)
    crops = prepare_images_uint8(heldout, model)[0].numpy()
    reference = export_model(model, tmp_path / "f32", "onnx", chunk=128)
    f32, i8 = ExportedModel(reference, threads=1), ExportedModel(out, threads=1)
    for key, name in (("image_scores", "image_scores"), ("maps", "anomaly_maps")):
        a = np.concatenate([i8.run(crops[i : i + 1])[name] for i in range(4)]).astype(np.float64)
        b = np.concatenate([f32.run(crops[i : i + 1])[name] for i in range(4)]).astype(np.float64)
        change = np.abs(a - b) / np.abs(b).max()
        assert drift[key]["max_rel_change"] == pytest.approx(change.max(), rel=1e-4, abs=1e-7), key
        assert drift[key]["median_rel_change"] == pytest.approx(np.median(change), rel=0.05, abs=1e-6), key
    patch = [form.fast.patch_scores(crops).numpy().astype(np.float64) for form in (i8, f32)]
    assert drift["patch_scores"]["max_rel_change"] == pytest.approx(
        (np.abs(patch[0] - patch[1]) / np.abs(patch[1]).max()).max(), rel=1e-4)
    assert 0 < drift["maps"]["max_rel_change"] < 0.1  # quantized: changed, and not beyond recognition


def test_int8_graph_is_guarded_by_the_manifest(int8, tmp_path) -> None:
    _, _, out = int8
    for name in ("features.onnx.data", "int8_drift.json"):
        copy = Path(shutil.copytree(out, tmp_path / name))
        with open(copy / name, "r+b") as handle:
            handle.seek(10)
            handle.write(b"\x07\x07\x07")
        with pytest.raises(ModelFilesError, match=rf"{name} was modified"):
            ExportedModel(copy)


def test_int8_openvino_conversion_keeps_the_fast_form(int8, tmp_path) -> None:
    model, calibration, out = int8
    converted = onnx_to_openvino(out, tmp_path / "openvino")
    assert {"features.xml", "features.bin", "bank.safetensors", "int8_drift.json"} <= {p.name for p in
                                                                                      converted.iterdir()}
    crops = prepare_images_uint8(calibration.split()[1], model)[0].numpy()
    onnx_scores = ExportedModel(out).run(crops)["image_scores"]
    ov_scores = ExportedModel(converted).run(crops)["image_scores"]
    assert np.abs(ov_scores - onnx_scores).max() / np.abs(onnx_scores).max() < 0.02  # both INT8 engines


def test_int8_settings_are_refused_before_any_work(tmp_path) -> None:
    model = _model()
    with pytest.raises(ValueError, match="precision=int8 needs nominal images"):
        export_model(model, tmp_path / "a", "onnx", precision="int8")
    with pytest.raises(ValueError, match="format=torchscript does not have"):
        export_model(model, tmp_path / "b", "torchscript", precision="int8", calibration=Calibration(_images(3), 2, 1))
    with pytest.raises(ValueError, match="precision='int4': choose one of"):
        export_model(model, tmp_path / "c", "onnx", precision="int4")
    with pytest.raises(ValueError, match=r"calibration.count \+ calibration.heldout = 20 images, but only 3"):
        Calibration(_images(3), count=16, heldout=4)
    with pytest.raises(ValueError, match=r"calibration.heldout=0 must be a positive integer"):
        Calibration(_images(3), count=2, heldout=0)
    assert not any(tmp_path.iterdir())


def test_cli_calibrates_on_the_saved_models_training_set(textures_root, tmp_path, monkeypatch) -> None:
    """``calibration.images=null``: the nominal training images of the dataset and category the saved model's
    metadata records, never its test images."""
    model = _model()
    dataset = {"_target_": "core.data.TexturesLayout", "root": str(textures_root), "categories": ["grass"],
               "resize": SIZE, "image_size": SIZE, "train_limit": None}
    model.save(tmp_path / "model", metadata={"category": "grass", "config": {"dataset": dataset}})
    cfg = OmegaConf.create({"model_dir": str(tmp_path / "model"),
                            "calibration": {"images": None, "count": 4, "heldout": 2, "seed": 0}})
    calibration = export_cli.calibration_set(cfg, model.load(tmp_path / "model", progress=False))
    train = TexturesLayout(root=textures_root, categories=["grass"]).train_samples("grass")
    assert sorted(map(str, calibration.images)) == sorted(str(sample.path) for sample in train)
    assert all("/train/good/" in str(path) for path in calibration.images)
    monkeypatch.setattr(sys, "argv", ["export.py", f"model_dir={tmp_path / 'model'}", "format=onnx",
                                      f"out={tmp_path / 'int8'}", "precision=int8", "calibration.count=4",
                                      "calibration.heldout=2"])
    export_cli.main()
    drift = json.loads((tmp_path / "int8" / "int8_drift.json").read_text())
    assert (drift["calibration_images"], drift["heldout_images"]) == (4, 2)


# --------------------------------------------------------------------------- threads and forms


def test_in_pieces_splits_the_batch_over_the_budget_in_order() -> None:
    seen = []

    def work(piece):
        seen.append((threading.get_ident(), torch.get_num_threads(), len(piece)))
        return piece * 10

    batch = np.arange(7)
    pieces = in_pieces(work, batch, threads=3)
    assert np.concatenate(pieces).tolist() == (batch * 10).tolist()
    assert sorted(size for _, _, size in seen) == [1, 3, 3] and {t for _, t, _ in seen} == {1}  # single-threaded
    seen.clear()
    assert in_pieces(work, batch, threads=1)[0].tolist() == (batch * 10).tolist() and len(seen) == 1


def test_pipelined_hands_back_every_batch_in_order_with_its_pieces() -> None:
    """Pieces of ``PIECE`` images on single-threaded workers, batches handed back in order whatever finishes
    first (the first piece sleeps longest), never more than the workers' worth of pieces queued behind the
    batch handed back; one worker scores each batch whole on the caller's thread."""
    seen, read = [], []

    def work(piece):
        time.sleep(0.02 if piece[0] == 0 else 0.0)
        seen.append((threading.get_ident(), torch.get_num_threads(), len(piece)))
        return piece * 10

    def batches():
        for start in range(0, 23, 6):
            read.append(start)
            yield start, np.arange(start, min(start + 6, 23))

    out = []
    for batch, parts in pipelined(work, batches(), workers=2):
        out.append((batch, np.concatenate(parts).tolist()))
        assert len(read) - len(out) <= 2  # backpressure: batches read ahead keep the two workers busy, no more
    assert [batch for batch, _ in out] == [0, 6, 12, 18]
    assert sum((values for _, values in out), []) == [value * 10 for value in range(23)]
    assert sorted(size for _, _, size in seen) == sorted([PIECE, 2] * 3 + [PIECE, 1])
    assert {threads for _, threads, _ in seen} == {1} and threading.get_ident() not in {t for t, _, _ in seen}
    seen.clear()
    whole = [(batch, parts[0].tolist()) for batch, parts in pipelined(work, batches(), workers=1)]
    assert [len(values) for _, values in whole] == [6, 6, 6, 5] and {t for t, _, _ in seen} == {threading.get_ident()}


def test_run_batches_equals_run_of_each_batch(tmp_path) -> None:
    """``run_batches`` (what ``predict_images`` uses) gives each batch's ``run`` outputs, both forms, one and two
    threads; a bad batch is refused with ``run``'s message."""
    model = _model()
    out = export_model(model, tmp_path / "onnx", "onnx", chunk=128)
    crops = prepare_images_uint8(_images(11), model)[0].numpy()
    batches = [crops[:3], crops[3:8], crops[8:]]
    for form in ("fast", "graph"):
        for threads in (1, 2):
            exported = ExportedModel(out, form=form, threads=threads)
            for streamed, batch in zip(exported.run_batches(batches), batches, strict=True):
                single = exported.run(batch)
                assert streamed.keys() == single.keys()
                for key in single:
                    np.testing.assert_allclose(streamed[key], single[key], rtol=1e-6, atol=1e-6)
    with pytest.raises(ExportedModelError, match="takes RGB images as"):
        list(ExportedModel(out).run_batches([crops[:, :1]]))


def test_threads_do_not_change_the_outputs(tmp_path) -> None:
    model = _model()
    out = export_model(model, tmp_path / "onnx", "onnx", chunk=128)
    crops = prepare_images_uint8(_images(5), model)[0]
    scores, maps = model.score(normalize(crops, model.preprocessing))
    for form in ("fast", "graph"):
        runs = [ExportedModel(out, form=form, threads=threads).run(crops.numpy()) for threads in (1, 2, 8)]
        for outputs in runs:
            np.testing.assert_allclose(outputs["image_scores"], scores.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(outputs["anomaly_maps"], maps.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportedModelError, match="threads=0: a positive number"):
        ExportedModel(out, threads=0)


def test_form_setting_and_an_export_without_the_fast_form(tmp_path) -> None:
    """An export written before the fast form (no ``fast`` node, no feature graph, no bank): the graph runs by
    default, ``form="fast"`` is refused with the fix."""
    out = export_model(_model(), tmp_path / "onnx", "onnx", chunk=128)
    with pytest.raises(ExportedModelError, match=r"form='quick': choose one of \('fast', 'graph'\)"):
        ExportedModel(out, form="quick")
    record = json.loads((out / "export.json").read_text())
    record.pop("fast")
    (out / "export.json").write_text(json.dumps(record))
    for name in ("features.onnx", "features.onnx.data", "bank.safetensors"):
        (out / name).unlink()
    write_manifest(out)
    assert ExportedModel(out).form == "graph"
    with pytest.raises(ExportedModelError, match="holds no fast form .*export the model again.*form='graph'"):
        ExportedModel(out, form="fast")
