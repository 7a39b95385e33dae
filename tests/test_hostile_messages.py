"""Issue 26, deliverable 9: clear messages, early. Each hostile input or fault gives one or two lines that
name the setting or path and what to do, in seconds (before any fit where the cause is known up front),
never a traceback or a number that measures nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from experiments.harness.fit_and_evaluate import run
from experiments.harness.results import format_table
from tests.conftest import write_tiny_category

TINY = ("dataset=folder", "dataset.resize=64", "dataset.image_size=64", "backbone=resnet18",
        "backbone.pretrained=false", "patchcore.embedder.embed_dim=64", "coreset.ratio=0.5", "logger=none",
        "viz.n=0")


def tiny(root: Path, *extra: str) -> tuple[str, ...]:
    return (*TINY, f"dataset.root={root}", *extra)


def test_a_test_set_without_nominal_or_defect_images_has_no_image_metrics(tmp_path, make_config, caplog) -> None:
    """No test/good: image AUROC and F1-max are null with the reason (not F1-max 100 %), said before the fit,
    listed under not_computable, and shown as missing ('-') by the printed table and the report's tables."""
    write_tiny_category(tmp_path / "data", "nogood", n_good=0)
    write_tiny_category(tmp_path / "data", "nodefect", n_bad=0)
    with caplog.at_level(logging.INFO, logger="patchcore"):
        results = run(make_config(*tiny(tmp_path / "data", "category=[nogood,nodefect]")), tmp_path / "run")
    messages = [record.getMessage() for record in caplog.records]
    first_fit = next(i for i, m in enumerate(messages) if "fitting on" in m)
    for category, missing in (("nogood", "no nominal test images (test/good)"),
                              ("nodefect", "no defect test images")):
        entry = results["categories"][category]
        assert entry["image_auroc"] is None and entry["image_f1_max"] is None
        assert missing in entry["image_metrics_note"] and "not computable" in entry["image_metrics_note"]
        early = [i for i, m in enumerate(messages) if m.startswith(f"[{category}] {missing}")]
        assert early and early[0] < first_fit  # warned at start-up, before any model work
    assert results["categories"]["nogood"]["pixel_auroc"] is not None  # defect images' own nominal pixels
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["not_computable"]["image_auroc"] == ["nogood", "nodefect"]
    assert on_disk["not_computable"]["image_f1_max"] == ["nogood", "nodefect"]
    assert on_disk["mean"]["image_f1_max"] is None and on_disk["mean"]["image_auroc"] is None
    rows = {line.split()[0]: line.split()[1:] for line in format_table(on_disk["categories"], on_disk["mean"])
            .splitlines()[:-1]}
    assert rows["nogood"][:2] == ["-", "-"] and rows["nodefect"][:2] == ["-", "-"] and rows["mean"][:2] == ["-", "-"]

    from experiments.reporting.data import discover, tidy
    from experiments.reporting.tables import metric_table

    runs, _ = discover([tmp_path / "run"])
    runs[0].variant = "tiny"
    table = metric_table(tidy(runs), "image_f1_max", ["tiny"])
    assert [[cell.text for cell in row] for row in table.rows] == [["nodefect", "-"], ["nogood", "-"], ["mean", "-"]]


@pytest.mark.parametrize(("backbone", "smallest"), [("resnet18", 17), ("effnet_lite0", 24)])
def test_b_image_size_too_small_for_the_backbone_is_refused_at_start_up(tmp_path, make_config, monkeypatch,
                                                                        backbone, smallest) -> None:
    """dataset.image_size=7: refused before any image is read, naming the setting, the value and the smallest
    crop that gives a 3x3 patch grid (resnet18's layer2 is at stride 8 with floor((n - 1) / 2) + 1 per halving:
    17 px -> 9 -> 5 -> 3 positions, 16 px gives 2; EfficientNet-Lite0's blocks.4 also at stride 8, but its
    'same' padding is fixed for 224 px inputs, so n // 8: 24 px). effnet_lite0 failed mid-fit before (a 5x5
    kernel on a 4x4 map), resnet18 ran on a 1x1 grid."""
    import torch

    from core.data import MVTecLayout

    write_tiny_category(tmp_path / "data", "widget")
    cfg = make_config(*tiny(tmp_path / "data", "category=widget", "dataset.image_size=7", f"backbone={backbone}"))
    read = []
    monkeypatch.setattr(MVTecLayout, "scan", lambda self, *a, **k: read.append(1) or [])
    with pytest.raises(ValueError) as refused:
        run(cfg, tmp_path / "run")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and not read  # before the start-up scan reads any image
    assert message.startswith("dataset.image_size=7 is too small for backbone")
    assert f"is {smallest} px; set dataset.image_size (and dataset.resize) to at least {smallest}" in message
    from experiments.harness.components import build

    extractor = build(cfg.backbone).eval()  # the number is exact: the smallest crop that works, not one less
    with torch.no_grad():
        assert tuple(extractor(torch.zeros(1, 3, smallest, smallest))[0].shape[-2:]) == (3, 3)
        assert tuple(extractor(torch.zeros(1, 3, smallest - 1, smallest - 1))[0].shape[-2:]) == (2, 2)
    assert not (tmp_path / "run" / "results.json").exists()


def test_c_mistyped_nprobe_is_named_with_its_type(tmp_path, make_config) -> None:
    """search.nprobe=abc: named with the type it must have (the constructor's type hint), before any work."""
    with pytest.raises(ValueError) as refused:
        run(make_config(*tiny(tmp_path / "data", "search.nprobe=abc")), tmp_path / "run")
    assert str(refused.value) == "bad settings, nothing was run:\n  search.nprobe=abc must be an integer"
    assert not (tmp_path / "run").exists()


def _read_only(monkeypatch, *folders: Path) -> None:
    """Make ``folders`` behave as on a read-only disk (chmod does not stop root, which the tests may run as):
    no temporary folder can be made in them and os.access says they cannot be written."""
    import os
    import tempfile

    real_mkdtemp, real_access = tempfile.mkdtemp, os.access
    blocked = {folder.resolve() for folder in folders}

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() in blocked:
            raise PermissionError(13, "Read-only file system", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    def access(path, mode, **kwargs) -> bool:
        if mode & os.W_OK and Path(path).resolve() in blocked:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_d_read_only_textures_root_is_named_before_generating(tmp_path, make_config, monkeypatch) -> None:
    """A read-only TEXTURES_ROOT: one line naming the folder and the fix, before any image is generated;
    a read-only root that already holds a complete generated set is used as it is."""
    import core.data.textures as textures
    from core.data import DatasetError, TexturesLayout

    counts = {"n_train": 2, "n_test_good": 1, "n_per_defect": 1}
    ready = textures.ensure_textures(tmp_path / "ready" / "textures", **counts)  # generated while writable
    generated = []
    monkeypatch.setattr(textures, "generate_textures", lambda *a, **k: generated.append(a))
    _read_only(monkeypatch, tmp_path / "ro", tmp_path / "ro" / "textures", tmp_path / "ready", ready)
    (tmp_path / "ro").mkdir()
    with pytest.raises(DatasetError) as refused:
        TexturesLayout(root=tmp_path / "ro" / "textures", **counts).train_samples("brick")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and not generated
    assert message.startswith(f"the textures dataset cannot be generated into {tmp_path / 'ro' / 'textures'}: "
                              f"{tmp_path / 'ro'} is not writable")
    assert "set TEXTURES_ROOT (or dataset.root) to a writable folder" in message
    (tmp_path / "ro" / "textures").mkdir()  # an empty read-only root itself: the same line, naming it
    with pytest.raises(DatasetError, match=f"{tmp_path / 'ro' / 'textures'} is not writable"):
        textures.ensure_textures(tmp_path / "ro" / "textures", **counts)
    with pytest.raises(DatasetError, match="set TEXTURES_ROOT"):  # through a run: before the fit
        run(make_config(*TINY[3:], "dataset=textures", f"dataset.root={tmp_path / 'ro' / 'textures'}",
                        "category=brick"), tmp_path / "run")
    assert not generated and not (tmp_path / "run" / "results.json").exists()

    layout = TexturesLayout(root=ready, **counts)  # read-only use of a complete set is legitimate
    assert [s.path.name for s in layout.train_samples("brick")] == ["000.png", "001.png"]
    assert sorted({s.defect_type for s in layout.test_samples("brick")}) == sorted(["good", *textures.TEXTURE_DEFECTS])
    assert not generated


@pytest.mark.parametrize("error", [RuntimeError("could not create a primitive"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "1073741824 bytes. Error code 12 (Cannot allocate memory)"),
                                   MemoryError()])
def test_e_out_of_memory_in_the_backbone_names_what_to_lower(tmp_path, make_config, monkeypatch, caplog,
                                                             error) -> None:
    """An out-of-memory in the backbone's forward: one line naming batch_size and dataset.image_size with
    their values, in the log and results.json, without a traceback; other errors keep theirs."""
    from core.backbones import TorchvisionCNN

    real_forward = TorchvisionCNN.forward

    def forward(self, images):
        if len(images) > 1:  # the fit's batches (the start-up size check runs one image)
            raise error
        return real_forward(self, images)

    monkeypatch.setattr(TorchvisionCNN, "forward", forward)
    write_tiny_category(tmp_path / "data", "widget")
    with caplog.at_level(logging.INFO, logger="patchcore"):
        results = run(make_config(*tiny(tmp_path / "data", "category=widget", "batch_size=4")), tmp_path / "run")
    failed = results["failed"]["widget"]
    assert failed.startswith(f"out of memory ({type(error).__name__}")
    assert failed.endswith("lower batch_size (now 4) or dataset.image_size (now 64), or run where more memory "
                           "is free") and len(failed.splitlines()) == 1
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == [f"[widget] failed: {failed}"]
    assert errors[0].exc_info is None  # no traceback
    assert json.loads((tmp_path / "run" / "results.json").read_text())["failed"] == {"widget": failed}


def test_e_other_errors_keep_their_traceback(tmp_path, make_config, monkeypatch, caplog) -> None:
    from core.backbones import TorchvisionCNN

    real_forward = TorchvisionCNN.forward
    monkeypatch.setattr(TorchvisionCNN, "forward", lambda self, images: real_forward(self, images)
                        if len(images) == 1 else (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    write_tiny_category(tmp_path / "data", "widget")
    results = run(make_config(*tiny(tmp_path / "data", "category=widget")), tmp_path / "run")
    assert results["failed"]["widget"] == "RuntimeError: shape mismatch"
    assert [r.exc_info is not None for r in caplog.records if r.levelno >= logging.ERROR] == [True]


INTERRUPT_DRIVER = '''
import sys
from experiments.harness.fit_and_evaluate import Harness
real = Harness.run_category
def run_category(self, category):
    if category == "b":
        raise KeyboardInterrupt  # a Ctrl-C inside the second category's fit
    return real(self, category)
Harness.run_category = run_category
from experiments.main import main
sys.argv = ["experiments/main.py", *sys.argv[1:]]
main()
'''


def test_f_ctrl_c_during_a_run_says_what_was_kept_and_exits_130(tmp_path, make_config, monkeypatch) -> None:
    """Ctrl-C in the second category: two lines (what was kept, how to resume), exit status 130, no traceback;
    and the same command run again resumes as the lines say (the first category is not fitted again)."""
    import os
    import subprocess
    import sys

    for category in ("a", "b"):
        write_tiny_category(tmp_path / "data", category)
    (tmp_path / "driver.py").write_text(INTERRUPT_DRIVER)
    overrides = [*tiny(tmp_path / "data", "category=[a,b]"), "num_workers=0", "progress=false"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), *overrides], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "KeyboardInterrupt" not in done.stdout + done.stderr
    [results] = (tmp_path / "outputs").glob("*/*/results.json")
    said = done.stderr.strip().splitlines()[-2:]
    assert said == [f"interrupted: 1 finished category (a) kept in {results};",
                    f"run the same command again from {tmp_path} (or with hydra.run.dir={results.parent}) to resume "
                    "without fitting them again"]
    monkeypatch.chdir(tmp_path)  # the same command again, from the same folder (in-process: one torch start less)
    again = run(make_config(*overrides), tmp_path / "outputs" / "later" / "run")
    assert again["complete"] is True and again["categories"]["a"]["resumed_from"] == str(results)
    assert "resumed_from" not in again["categories"]["b"]


def _interrupted(capsys, main, *args) -> list[str]:
    """Call an entry point's main; it must end with status 130 and say so in one or two lines, no traceback."""
    with pytest.raises(SystemExit) as stopped:
        main(*args)
    out, err = capsys.readouterr()
    assert stopped.value.code == 130 and "Traceback" not in out + err
    said = err[err.index("interrupted: "):].strip().splitlines()
    assert 1 <= len(said) <= 2
    return said


def test_f_ctrl_c_in_the_other_entry_points(tmp_path, monkeypatch, capsys) -> None:
    """finetune, study, export and predict: the same helper, each saying what its own resume does."""
    import experiments.export
    import experiments.finetune
    import experiments.harness.finetuning
    import experiments.predict
    import experiments.study
    from core.patchcore import PatchCore

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiments.study, "load_study", ctrl_c)
    said = _interrupted(capsys, experiments.study.main, ["--study", "quick"])
    assert said == ["interrupted: finished jobs are kept in the study folder; run the same command again to resume "
                    "(finished jobs are skipped)"]

    monkeypatch.setattr(experiments.harness.finetuning, "run", ctrl_c)
    monkeypatch.setattr("sys.argv", ["finetune.py", "method=rotation", f"hydra.run.dir={tmp_path / 'ft'}"])
    said = _interrupted(capsys, experiments.finetune.main)
    assert said[0].startswith("interrupted: finished categories' checkpoints are kept, and the interrupted one "
                              "continues from its last resume file")
    assert said[1] == "run the same command again to resume (resume=true)"

    monkeypatch.setattr(PatchCore, "load", ctrl_c)
    monkeypatch.setattr("sys.argv", ["export.py", f"model_dir={tmp_path}", f"out={tmp_path / 'export'}"])
    said = _interrupted(capsys, experiments.export.main)
    assert said == ["interrupted: nothing was exported (the folder is written whole or not at all); run the same "
                    "command again"]
    assert not (tmp_path / "export").exists()

    monkeypatch.setattr(experiments.predict, "predict", ctrl_c)
    monkeypatch.setattr("sys.argv", ["predict.py", f"model_dir={tmp_path}", "images=x.png",
                                     f"out={tmp_path / 'preds'}"])
    said = _interrupted(capsys, experiments.predict.main)
    assert said == ["interrupted: the prediction did not finish, and an earlier prediction in out is unchanged "
                    "(the outputs replace it only once complete); run the same command again (with overwrite=true "
                    "if out holds an earlier prediction)"]
