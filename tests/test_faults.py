"""The hostile-input and fault probe of issue 17, kept as tests: one (or a few) per finding, each asserting
what must happen (the file is not created, the message names the file or setting and the fix, exit codes)."""

from __future__ import annotations

import gc
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.backbones import TorchvisionCNN
from core.features import PatchEmbedder
from core.model_files import write_manifest
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
    stack = lambda rows: torch.stack([row[0] for row in rows])  # noqa: E731 - bare image batches
    model.fit(DataLoader(TensorDataset(_images(2)), batch_size=2, collate_fn=stack))
    return model.save(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture
def saved(fitted_model, tmp_path) -> Path:
    """A private copy of the saved model, for a test to tamper with."""
    return Path(shutil.copytree(fitted_model, tmp_path / "model"))


def _edit_record(model_dir: Path, **changes) -> None:
    """Change model.json on purpose and re-seal the manifest, so the checks behind the manifest are reached
    (an edit without re-sealing is refused by the manifest: tests/test_self_contained.py)."""
    record = json.loads((model_dir / "model.json").read_text())
    record.update(changes)
    (model_dir / "model.json").write_text(json.dumps(record))
    write_manifest(model_dir)


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


SCORING = {"num_neighbors": 1, "reweight_neighbors": None, "distance": "euclidean", "image_score": "max",
           "top_percent": 1.0, "blur_sigma": 4.0}


@pytest.mark.parametrize(("change", "what"), [
    ({"format_version": "1"}, r"format_version='1' must be an integer"),
    ({"format_version": 99}, r"format_version=99 but this code reads version 3"),
    ({"scoring": {**SCORING, "num_neighbors": "three"}},
     r"patchcore\.scoring\.num_neighbors='three' must be an integer >= 1"),  # the constructor's own check
    ({"scoring": {**SCORING, "blur_sigma": -1}}, r"patchcore\.scoring\.blur_sigma=-1 must be >= 0"),
    ({"scoring": {**SCORING, "distance": ["cosine"]}}, r"patchcore\.scoring\.distance=\['cosine'\]: choose one of"),
    ({"scoring": {**SCORING, "turbo": True}}, r"scoring=.* must be an object with exactly the keys \['blur_sigma'"),
    ({"scoring": {"num_neighbors": 1}}, r"scoring=.* must be an object with exactly the keys"),
    ({"scoring": "max"}, r"scoring='max' must be an object"),
    ({"grid": [4]}, r"grid=\[4\] must be"),
    ({"surprise": 1}, r"unknown keys \['surprise'\]"),
    ({"search": {"backend": "exact", "turbo": True}}, r"search=.* must be an object with keys among \['backend'"),
    ({"search": {"backend": "annoy"}}, r"search\.backend='annoy': choose one of"),
    ({"extractor": "resnet18"}, r"extractor='resnet18' must be an object"),
])
def test_model_json_is_checked_against_its_schema(saved, change, what) -> None:
    _edit_record(saved, **change)
    with pytest.raises(ModelMismatchError, match=rf"model .*model\.json is not valid: {what}.*; refit it"):
        PatchCore.load(saved)


def test_format_2_folder_is_refused_with_refit(saved) -> None:
    """Format 2 kept the scoring settings as flat keys; this code reads the ``scoring`` node only."""
    record = json.loads((saved / "model.json").read_text())
    assert record["scoring"] == SCORING
    record.update(record.pop("scoring"), format_version=2)
    (saved / "model.json").write_text(json.dumps(record))
    write_manifest(saved)
    with pytest.raises(ModelMismatchError, match=r"written by an earlier version of this code \(format_version=2\), "
                                                 r"which this version \(format 3\) does not read; refit it"):
        PatchCore.load(saved)


def test_missing_key_and_invalid_json_name_the_file(saved) -> None:
    record = json.loads((saved / "model.json").read_text())
    del record["embedder"]
    (saved / "model.json").write_text(json.dumps(record))
    write_manifest(saved)
    with pytest.raises(ModelMismatchError, match=r"model\.json is not valid: the key 'embedder' is missing; refit"):
        PatchCore.load(saved)
    (saved / "model.json").write_text("{not json")
    write_manifest(saved)
    with pytest.raises(ModelMismatchError, match=rf"{saved / 'model.json'} is not valid JSON"):
        PatchCore.load(saved)


@pytest.mark.parametrize("damage", ["empty", "truncated", "keyless", "pickle", "nan", "size"])
@pytest.mark.parametrize("resealed", [False, True])
def test_damaged_bank_gives_a_clear_message(saved, tmp_path, damage, resealed) -> None:
    """Refused by the manifest; and, with the manifest re-sealed over the damage, by the bank's own checks."""
    from safetensors.torch import save_file

    bank = saved / "bank.safetensors"
    victim = tmp_path / "ran.txt"
    rows = len(PatchCore.load(saved).bank)
    if damage == "empty":
        bank.write_bytes(b"")
    elif damage == "truncated":
        bank.write_bytes(bank.read_bytes()[:200])
    elif damage == "keyless":
        save_file({"rows": torch.zeros(3, 16)}, bank)
    elif damage == "pickle":
        class Payload:
            def __reduce__(self):
                return (Path.write_text, (victim, "x"))
        bank.write_bytes(pickle.dumps({"features": Payload()}))
    elif damage == "nan":
        save_file({"features": torch.full((8, 16), float("nan"))}, bank)
    else:
        save_file({"features": torch.zeros(rows + 2, 16)}, bank)
    if resealed:
        write_manifest(saved)
        expected = {"empty": "missing or empty", "truncated": "cannot be read", "keyless": "no non-empty",
                    "pickle": "cannot be read as a safetensors file.*no code in it was run", "nan": "8 rows with NaN",
                    "size": "bank_size="}[damage]
    else:
        expected = r"bank\.safetensors was modified after the model was saved .*re-copy the whole folder"
    pattern = rf"saved model {saved} is not valid: .*{expected}.*refit it"
    with pytest.raises(ModelMismatchError, match=pattern) as raised:
        PatchCore.load(saved)
    assert "weights_only" not in str(raised.value)  # never torch's advice to unpickle untrusted code
    assert not victim.exists()


def test_non_finite_scores_are_an_error_not_a_decision(saved, tmp_path, monkeypatch) -> None:
    from PIL import Image

    from experiments.harness.prediction import predict

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
        "backbone.pretrained=false", "backbone.layers=[layer2]", "patchcore.embedder.embed_dim=16", "coreset.ratio=0.5",
        "logger=none", "viz.n=0")


def tiny_config(make_config, root: Path, *extra: str):
    from tests.conftest import for_model

    return make_config(*for_model(TINY, f"dataset.root={root}", "category=widget", *extra))


def test_one_missing_mask_keeps_pixel_metrics_for_the_others(tmp_path, make_config) -> None:
    from experiments.harness.fit_and_evaluate import run
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

    from experiments.harness.fit_and_evaluate import run
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


# --------------------------------------------------------------------------- no silent overwrite (finding 3)


@pytest.fixture
def scorable(saved, tmp_path) -> Path:
    """``saved`` with the preprocessing record predict needs, and two images with the same stem."""
    from PIL import Image

    _edit_record(saved, metadata={"preprocessing": {"resize": 32, "image_size": 32}, "threshold": None})
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 32), (120, 90, 60)).save(tmp_path / folder / "part.png")
    return saved


def test_predict_refuses_an_out_folder_holding_earlier_results(scorable, tmp_path) -> None:
    from experiments.harness.prediction import OutputFolderError, predict

    images = [str(tmp_path / "a" / "part.png"), str(tmp_path / "b" / "part.png")]
    rows = predict(scorable, images, tmp_path / "preds", progress=False)
    assert [r["heatmap"] for r in rows] == ["part_heatmap.png", "part_2_heatmap.png"]  # same stem: both kept
    before = (tmp_path / "preds" / "predictions.csv").read_text()
    with pytest.raises(OutputFolderError, match=r"out=.*preds already holds the results of an earlier prediction.*"
                                                r"overwrite=true"):
        predict(scorable, images[:1], tmp_path / "preds", progress=False)
    assert (tmp_path / "preds" / "predictions.csv").read_text() == before  # nothing lost
    assert len(predict(scorable, images[:1], tmp_path / "preds", progress=False, overwrite=True)) == 1
    assert not (tmp_path / "preds" / "part_2_heatmap.png").exists()  # the earlier run's files replaced, not mixed


def test_main_refuses_a_run_folder_of_another_config(tmp_path, make_config) -> None:
    from experiments.harness.fit_and_evaluate import run
    from experiments.harness.run_key import RunDirTaken
    from tests.conftest import write_tiny_category

    write_tiny_category(tmp_path / "data", "widget", size=32)
    run(tiny_config(make_config, tmp_path / "data"), tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(RunDirTaken, match=r"already holds the complete results of another config.*hydra\.run\.dir"):
        run(tiny_config(make_config, tmp_path / "data", "coreset.ratio=0.25"), tmp_path / "run")
    assert (tmp_path / "run" / "results.json").read_text() == before


def test_a_config_in_progress_is_not_run_twice(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from experiments.harness.run_key import claim_run

    with claim_run("abc", tmp_path / "one", cwd=tmp_path) as first:
        assert first is None
        with claim_run("abc", tmp_path / "two", cwd=tmp_path) as second:  # a live holder: skip
            assert second["pid"] == os.getpid() and second["run_dir"] == str(tmp_path / "one")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = tmp_path / "outputs" / ".in_progress" / "abc.json"
    import socket
    marker.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "run_dir": "x"}))
    with claim_run("abc", tmp_path / "three", cwd=tmp_path) as third:  # left by a killed process: taken over
        assert third is None and json.loads(marker.read_text())["pid"] == os.getpid()
    assert not marker.exists()


def test_nothing_scored_exits_non_zero_and_lists_every_input(scorable, tmp_path) -> None:
    import csv
    import subprocess
    import sys

    (tmp_path / "broken.png").write_bytes(b"not an image")
    command = [sys.executable, str(REPO / "experiments" / "predict.py"), f"model_dir={scorable}",
               f"images=[{tmp_path / 'broken.png'},{tmp_path / 'gone.png'}]", f"out={tmp_path / 'cli'}",
               "progress=false", "device=cpu"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode != 0 and "none of the 1 images could be scored" in done.stderr
    with (tmp_path / "cli" / "skipped.csv").open() as handle:
        skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(handle)}
    assert set(skipped) == {"broken.png", "gone.png"} and skipped["gone.png"] == "no such file"
    assert "cannot read image" in skipped["broken.png"]
    again = subprocess.run([*command[:-1], "device=cpu"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode != 0 and "overwrite=true" in again.stderr  # the earlier skipped.csv is kept


# --------------------------------------------------------------------------- settings before any work (finding 5)


@pytest.mark.parametrize(("overrides", "message"), [
    (("threshold=nominal_sigma", "threshold.k=abc"), "threshold.k=abc must be a number"),
    (("threshold=nominal_sigma", "threshold.k=-1"), "threshold.k=-1 must be >= 0"),
    (("threshold=nominal_sigma", "threshold.validation_fraction=0"),
     "threshold.validation_fraction=0 but threshold=nominal_sigma fits its threshold on held-out nominal"),
    (("dataset.image_size=0",), "dataset.image_size=0 must be a positive number of pixels"),
    (("dataset.image_size=64",), "dataset.image_size=64 must be <= dataset.resize=32"),
    (("batch_size=0",), "batch_size=0 must be >= 1"),
    (("batch_size=two",), "batch_size=two must be an integer"),
    (("save_model=maybe",), "save_model='maybe': choose true"),
    (("viz.n=-1",), "viz.n=-1 must be an integer >= 0"),
    (("patchcore.embedder.embed_dim=0",), "patchcore.embedder.embed_dim=0 must be positive, or null"),
    (("patchcore.embedder.patch_size=x",), "patchcore.embedder.patch_size=x must be an integer"),
    (("patchcore.scoring.num_neighbors=0",), "patchcore.scoring.num_neighbors=0 must be"),
    (("patchcore.scoring.distance=manhattan",), "patchcore.scoring.distance='manhattan'"),
    (("coreset.ratio=abc",), "coreset.ratio=abc must be a number"),
    (("coreset.ratio=1.5",), "coreset.ratio=1.5 must be in (0, 1]"),
    (("storage.spill_above_gb=-1",), "storage.spill_above_gb=-1 must be >= 0"),
    (("search.nprobe=0",), "search.nprobe=0 must be positive"),
    (("model=cae", "cae.epochs=abc"), "cae.epochs=abc must be an integer"),
])
def test_bad_settings_fail_by_name_before_any_image_is_read(tmp_path, make_config, monkeypatch, overrides,
                                                             message) -> None:
    """Start-up validation: building the object graph once checks every setting, each in the class that
    takes it, before any image (or image header) is opened; it takes well under the 2 s the issue asks."""
    import time

    from experiments.harness import fit_and_evaluate as harness
    from tests.conftest import write_tiny_category

    write_tiny_category(tmp_path / "data", "widget", size=32)
    monkeypatch.setattr("PIL.Image.open", lambda *a, **k: pytest.fail("an image was read before the check"))
    cfg = tiny_config(make_config, tmp_path / "data", *overrides)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=re_escape(message)):
        harness.run(cfg, tmp_path / "run")
    assert time.perf_counter() - started < 2.0
    assert not (tmp_path / "run" / "results.json").exists()


def test_every_mistyped_setting_is_named_at_once(make_config) -> None:
    from experiments.harness.run_settings import validate

    cfg = make_config("batch_size=x", "coreset.ratio=y", "patchcore.scoring.top_percent=z", "dataset.resize=w")
    with pytest.raises(ValueError) as error:
        validate(cfg)
    lines = str(error.value).splitlines()[1:]
    assert sorted(line.strip() for line in lines) == [
        "batch_size=x must be an integer", "coreset.ratio=y must be a number", "dataset.resize=w must be an integer",
        "patchcore.scoring.top_percent=z must be a number"]


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_unwritable_run_folder_and_cache_are_found_at_start_up(tmp_path, make_config, caplog) -> None:
    from experiments.harness.fit_and_evaluate import run
    from tests.conftest import write_tiny_category

    write_tiny_category(tmp_path / "data", "widget", size=32)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ValueError, match=r"the run folder \(hydra\.run\.dir\) .*file/run cannot be written"):
        run(tiny_config(make_config, tmp_path / "data"), tmp_path / "file" / "run")
    results = run(tiny_config(make_config, tmp_path / "data", f"storage.cache_dir={tmp_path / 'file' / 'cache'}"),
                  tmp_path / "run")
    assert results["complete"] is True  # no cache, with a warning, instead of a failed fit
    assert "storage.cache_dir=" in caplog.text and "fitting without the feature cache" in caplog.text


def test_unreadable_test_image_and_bad_mask_found_before_the_fit(tmp_path, make_config, monkeypatch) -> None:
    from PIL import Image

    from core.data import DatasetError
    from experiments.harness import fit_and_evaluate as harness
    from tests.conftest import write_tiny_category

    base = write_tiny_category(tmp_path / "data", "widget", n_bad=3, size=32)
    (base / "test" / "good" / "001.png").write_bytes(b"\x89PNG truncated")
    Image.new("L", (16, 16)).save(base / "ground_truth" / "spot" / "002_mask.png")
    (tmp_path / "data" / "other").mkdir()  # a second, readable category: its results are kept
    write_tiny_category(tmp_path / "data", "other", size=32)
    fitted = []
    original = harness.Harness.run_category
    monkeypatch.setattr(harness.Harness, "run_category", lambda self, c: fitted.append(c) or original(self, c))
    results = harness.run(tiny_config(make_config, tmp_path / "data", "category=all"), tmp_path / "run")
    assert fitted == ["other"]  # the category with unreadable files is never fitted
    assert re.match(r"(?s)UnreadableFilesError: 2 unreadable files in category 'widget':\n.*test/good/001\.png.*\n.*"
                    r"002_mask\.png is 16x16 but image .* is 32x32.*dataset\.skip_unreadable",
                    results["failed"]["widget"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["failed"] == results["failed"]
    with pytest.raises(DatasetError, match="2 unreadable files"):  # no usable category: fails in seconds
        harness.run(tiny_config(make_config, tmp_path / "data"), tmp_path / "run1")
    monkeypatch.undo()
    results = harness.run(tiny_config(make_config, tmp_path / "data", "dataset.skip_unreadable=true"),
                          tmp_path / "run2")
    entry = results["categories"]["widget"]
    assert entry["n_test"] == 3 and len(entry["skipped_inputs"]) == 2  # 5 test images, 2 skipped and listed


def test_dataset_root_that_is_a_file_says_so(tmp_path, make_config) -> None:
    from core.data import DatasetError
    from experiments.harness.fit_and_evaluate import run

    (tmp_path / "data").write_text("x")
    with pytest.raises(DatasetError, match=r"dataset root .*data is a file, not a folder"):
        run(tiny_config(make_config, tmp_path / "data"), tmp_path / "run")


# --------------------------------------------------------------------------- memory (finding 7)


def _batches(count: int, patches: int = 16, dim: int = 8):
    from core.storage import EmbeddedBatch

    for seed in range(count):
        features = torch.rand(2, patches, dim, generator=torch.Generator().manual_seed(seed))
        yield EmbeddedBatch(features, (4, 4), (32, 32))


def test_buffer_over_the_memory_budget_spills_to_a_file(tmp_path, monkeypatch, caplog) -> None:
    import tempfile

    from core.storage import FeatureStore, StorageOptions

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    store = FeatureStore(StorageOptions(memory_budget_gb=1e-6), "cpu")  # 1 kB: the 4 kB buffer does not fit
    with store.gather(_batches(4), images=8) as features:
        assert features.info["spilled"] is True and features.shape == (128, 8)
        spill = list(tmp_path.glob("features-*.npy"))
        assert len(spill) == 1
        expected = torch.cat([b.features.reshape(-1, 8) for b in _batches(4)])
        assert torch.equal(features[0:128], expected)
    assert not spill[0].exists()  # released with the block
    assert "does not fit in the memory budget (0.00 GB, storage.memory_budget_gb): spilling" in caplog.text


def test_buffer_too_large_for_memory_and_disk_stops_at_the_first_batch(tmp_path, monkeypatch) -> None:
    import shutil
    import tempfile

    from core.storage import BufferTooLargeError, FeatureStore, StorageOptions

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 100))
    seen = []

    def batches():
        for batch in _batches(700):
            seen.append(batch)
            yield batch

    store = FeatureStore(StorageOptions(memory_budget_gb=1e-6), "cpu")
    with pytest.raises(BufferTooLargeError, match=r"needs 0\.00 GB \(22400 patches x 8 dims x 4 bytes\): more than "
                                                  r"the memory budget .* storage\.dtype=float16.*"
                                                  r"patchcore\.embedder\.embed_dim"
                                                  r".*dataset\.train_limit"):
        store.gather(batches(), images=1400)
    assert len(seen) == 1 and list(tmp_path.iterdir()) == []  # stopped at once, nothing left behind


# --------------------------------------------------------------------------- clear errors, bookkeeping (finding 6, 8)


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        from core.data import DatasetError

        raise DatasetError(f"cannot read image /data/{index}.png: truncated. Replace or delete the file.")


def test_dataloader_worker_error_is_unwrapped_to_the_datasets_message() -> None:
    from core.data import DatasetError
    from experiments.harness.results import failure_message

    # a spawned worker: this test process has loaded threaded native runtimes by now (ONNX Runtime, OpenVINO in
    # the export tests), and a forked child of such a process crashed it (a run never loads them before its loader)
    batches = iter(DataLoader(_Unreadable(), num_workers=1, multiprocessing_context="spawn"))
    with pytest.raises(DatasetError) as raised:
        next(batches)
    handed_over, message = str(raised.value), failure_message(raised.value)
    del raised, batches  # the failed iterator's worker is shut down now, not at a later garbage collection
    gc.collect()
    assert "Original Traceback" in handed_over  # what torch hands over
    assert message == "DatasetError: cannot read image /data/0.png: truncated. Replace or delete the file."


def test_orphan_cache_temporaries_of_dead_processes_are_removed(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from core.storage import FeatureStore, StorageOptions

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    orphan, live = tmp_path / f".abc123.{dead}.tmp.npy", tmp_path / f".def456.{os.getpid()}.tmp.npy"
    orphan.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    FeatureStore(StorageOptions(cache_dir=str(tmp_path)), "cpu")
    assert not orphan.exists() and live.exists()


# --------------------------------------------------------------------------- kill -9 during fit, then resume


def test_kill_9_during_fit_then_resume(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import write_tiny_category

    write_tiny_category(tmp_path / "data", "alpha", size=32)
    write_tiny_category(tmp_path / "data", "beta", n_train=120, size=64)  # slow enough to be killed in its fit
    command = [sys.executable, str(REPO / "experiments" / "main.py"), *TINY, f"dataset.root={tmp_path / 'data'}",
               "dataset.resize=64", "dataset.image_size=64", "category=[alpha,beta]", "num_workers=0",
               "progress=false", "coreset.ratio=0.9", f"hydra.run.dir={tmp_path / 'run'}"]
    results_file = tmp_path / "run" / "results.json"
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not results_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # alpha is done, beta is being fitted
    process.wait()
    killed = json.loads(results_file.read_text())  # valid JSON: written atomically
    assert list(killed["categories"]) == ["alpha"] and killed["complete"] is False
    assert list((tmp_path / "outputs" / ".in_progress").iterdir())  # the dead run's marker is left behind
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads(results_file.read_text())
    assert final["complete"] is True and set(final["categories"]) == {"alpha", "beta"}
    assert final["config_hash"] == killed["config_hash"]
    alpha = final["categories"]["alpha"]  # taken over from the killed run, not fitted again
    assert alpha.pop("resumed_from") == str(results_file) and alpha == killed["categories"]["alpha"]
    log = done.stdout + done.stderr
    assert "resuming" in log and "alpha already finished there" in log
    rows = (tmp_path / "run" / "scores.csv").read_text().splitlines()
    assert sum(row.startswith("alpha,") for row in rows) == 4 and sum(row.startswith("beta,") for row in rows) == 4
    assert not list((tmp_path / "outputs" / ".in_progress").iterdir())  # taken over, then released


# --------------------------------------------------------------------------- leftovers of the probe (findings 6, 8)


def test_unwritable_hydra_run_dir_is_one_clear_line(tmp_path) -> None:
    """Hydra opens its log file in the run folder before the task runs: the callback stops it first."""
    import subprocess
    import sys

    (tmp_path / "file").write_text("a file, not a folder")
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "main.py"), f"hydra.run.dir={tmp_path}/file/run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the output folder (hydra.run.dir) {tmp_path}/file/run cannot be written: {tmp_path}/file is a file, "
        "not a folder; choose another")


def test_float_tiffs_are_scaled_not_turned_black(tmp_path) -> None:
    # Issue 26: float pixels mean 0..1 (core.data.pixels), whatever their values; a 0..255 float TIFF is
    # refused with the fix named rather than read by a rule that depends on the image's maximum.
    import numpy as np
    from PIL import Image

    from core.data import DatasetError, Preprocessing, read_image
    from core.data.pixels import to_rgb8

    ramp = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")  # mode F, values in [0, 1]
    Image.fromarray(ramp * 255).save(tmp_path / "byte.tif")  # mode F, values in [0, 255]
    image = to_rgb8(read_image(tmp_path / "unit.tif"))
    np.testing.assert_array_equal(np.asarray(image)[..., 0], np.round(ramp * 255).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"byte\.tif \(a float image, PIL mode F\) must hold values in \[0, 1\] "
                                           r"\(got \[0, 255\]\).*divide by 255"):
        Preprocessing(resize=4, image_size=4).image(read_image(tmp_path / "byte.tif"), f"image {tmp_path / 'byte.tif'}")
    Image.fromarray(ramp * 1000 - 5).save(tmp_path / "odd.tif")
    with pytest.raises(DatasetError, match=r"odd\.tif \(a float image, PIL mode F\) must hold values in \[0, 1\] "
                                           r"\(got \[-5, 995\]\).*8-bit PNG"):
        to_rgb8(read_image(tmp_path / "odd.tif"), f"image {tmp_path / 'odd.tif'}")


def test_threshold_on_a_single_held_out_image_warns(tmp_path, make_config, caplog) -> None:
    from experiments.harness.fit_and_evaluate import run
    from tests.conftest import write_tiny_category

    write_tiny_category(tmp_path / "data", "widget", n_train=3, size=32)
    results = run(tiny_config(make_config, tmp_path / "data", "threshold=nominal_sigma",
                              "threshold.validation_fraction=0.34"), tmp_path / "run")
    threshold = results["categories"]["widget"]["threshold"]
    assert threshold["n_validation"] == 1
    assert threshold["warning"].startswith("the threshold was fitted on only 1 held-out nominal image (fewer than 5)")
    assert "threshold.validation_fraction" in threshold["warning"] and threshold["warning"] in caplog.text


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from core.io import atomic_write, remove_dead_temporaries

    seen = []
    atomic_write(tmp_path / "results.json", lambda tmp: (seen.append(tmp.name), tmp.write_text("{}")))
    assert seen[0].startswith(f".results.json.{os.getpid()}.") and seen[0].endswith(".tmp")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / "models" / "widget").mkdir(parents=True)
    orphan = tmp_path / "models" / "widget" / f".bank.safetensors.{dead}.k2j_x9.tmp"
    live = tmp_path / f".scores.csv.{os.getpid()}.abc123.tmp"
    orphan.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    assert remove_dead_temporaries(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and (tmp_path / "results.json").read_text() == "{}"
