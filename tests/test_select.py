"""Label-free configuration selection (experiments/selection.py, experiments/harness/selection.py): never reads
test/, finds a winner known by construction, resumes without refitting, is deterministic for a seed, and
``main.py selection=`` composes the very config of typing the chosen overrides by hand."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from core.patchcore import PatchCore
from experiments.harness import selection as sel
from experiments.harness.results import config_record
from experiments.harness.selection_file import apply_selection, read_selection

CONF = str(Path(__file__).resolve().parents[1] / "conf")
BASE = ["dataset=folder", "dataset.resize=48", "dataset.image_size=48", "backbone=resnet18",
        "backbone.pretrained=false", "progress=false", "logger=none",
        "batch_size=4", "patchcore.embedder.embed_dim=64"]


def _stripes(root: Path, n_train: int = 8, name: str = "stripes") -> Path:
    """A category of vertical stripes (random phase); test/ holds images too, which must never be opened."""
    rng = np.random.default_rng(0)
    for split, n in (("train/good", n_train), ("test/good", 2), ("test/bad", 2)):
        folder = root / name / split
        folder.mkdir(parents=True)
        for i in range(n):
            row = (((np.arange(48) + rng.integers(0, 8)) // 4) % 2 * 160 + 40).astype(np.uint8)
            Image.fromarray(np.stack([np.tile(row, (48, 1))] * 3, -1)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def data(tmp_path) -> Path:
    return _stripes(tmp_path / "data")


@pytest.fixture
def no_test_reads(monkeypatch, data):
    """Any open of a path under test/ fails from here on (chmod cannot stop root); ``data`` is written first."""
    real_open, real_image_open = builtins.open, Image.open

    def guard(path) -> None:
        if "/test/" in str(path).replace("\\", "/"):
            raise AssertionError(f"opened a test image: {path}")

    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: (guard(file), real_open(file, *a, **k))[1])
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (guard(fp), real_image_open(fp, *a, **k))[1])


def _run(root: Path, run_dir: Path, space: dict, extra: tuple[str, ...] = (), halving: dict | None | str = "default",
         base: tuple[str, ...] | list[str] = tuple(BASE)) -> dict:
    task = [*base, f"dataset.root={root}", *extra]
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("select", overrides=task)
        with open_dict(cfg):
            cfg.select.space = space
            cfg.select.holdout = 0.25
            if halving != "default":
                cfg.select.halving = halving
        return sel.run_selection(cfg, run_dir, task, lambda o: compose("config", overrides=o), "test")


SPACE = {"combine": "one_at_a_time", "axes": {"neighbourhood": [["patchcore.embedder.patch_size=1"]]},
         "layers": {"resnet18": [["backbone.layers=[layer1]"]]}}
LAYERS = {"combine": "grid", "axes": {}, "layers": {"resnet18": [["backbone.layers=[layer3]"],
                                                                  ["backbone.layers=[layer1]"]]}}


def test_finds_the_layer_that_sees_the_texture_and_never_reads_test(tmp_path, data, no_test_reads):
    # Stripes 4 px wide: layer1 (stride 4) resolves them; layer3 (stride 16) sees a 3x3 grid of 48 px crops in
    # which the small synthetic anomalies are averaged away. The deep candidate is listed first, so only a
    # higher proxy score (not the tie rule) can choose layer1.
    record = _run(data, tmp_path / "run", LAYERS)
    node = record["categories"]["stripes"]
    scores = {e["name"]: e["score"] for e in node["candidates"]}
    assert node["chosen"] == "backbone.layers=[layer1]"
    assert scores["backbone.layers=[layer1]"] > scores["backbone.layers=[layer3]"] + 0.2
    assert record["chosen"]["stripes"][-1] == "backbone.layers=[layer1]"
    assert record["complete"] and record["metric"] == "mean_auroc" and record["seed"] == 0
    on_disk = read_selection(tmp_path / "run" / "selection.json")
    assert on_disk["chosen"] == record["chosen"]
    assert all(e["n_fit"] == 6 and e["n_held_out"] == 2 for e in node["candidates"])  # 8 train/good: 2 held out


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_resume_after_an_interrupt_refits_nothing_already_scored_and_is_deterministic(tmp_path, monkeypatch, data,
                                                                                       no_test_reads):
    root = data
    fits: list[int] = []
    interrupt = [True]
    real_fit = PatchCore.fit

    def counted(self, *args, **kwargs):
        fits.append(1)
        if len(fits) == 2 and interrupt and interrupt.pop():
            raise KeyboardInterrupt  # Ctrl-C while the second candidate fits
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(PatchCore, "fit", counted)
    with pytest.raises(KeyboardInterrupt):
        _run(root, tmp_path / "run", LAYERS)
    partial = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert partial["complete"] is False and len(partial["categories"]["stripes"]["candidates"]) == 1
    with pytest.raises(ValueError, match="unfinished"):
        read_selection(tmp_path / "run" / "selection.json")
    fits.clear()
    resumed = _run(root, tmp_path / "run", LAYERS)
    assert len(fits) == 1  # only the interrupted candidate is fitted again
    assert [e.get("resumed", False) for e in resumed["categories"]["stripes"]["candidates"]] == [True, False]
    fits.clear()
    fresh = _run(root, tmp_path / "fresh", LAYERS)
    assert len(fits) == 2
    for entry in resumed["categories"]["stripes"]["candidates"]:
        entry.pop("resumed", None)
    assert fresh.pop("commands") != resumed.pop("commands")  # they name their own folder
    assert _without_times(fresh) == _without_times(resumed)  # same seed, same selection (times aside)


def test_main_with_selection_composes_the_config_of_the_overrides_by_hand(tmp_path):
    chosen = ["dataset=folder", f"dataset.root={tmp_path}", "backbone=resnet18", "backbone.layers=[layer1]",
              "patchcore.scoring.num_neighbors=3", "coreset.ratio=0.01"]
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": "patchcore-selection", "version": 1, "complete": True,
                                "chosen": {"a": chosen, "b": chosen}}))
    argv = apply_selection([f"selection={path}", "category=a", "seed=3"])
    assert argv == [*chosen, "category=a", "seed=3"]
    with initialize_config_dir(CONF, version_base="1.3"):
        applied = config_record(compose("config", overrides=argv))
        by_hand = config_record(compose("config", overrides=[*chosen, "category=a", "seed=3"]))
    assert json.dumps(applied, sort_keys=True) == json.dumps(by_hand, sort_keys=True)
    assert applied["backbone"]["layers"] == ["layer1"] and applied["coreset"]["ratio"] == 0.01
    # an override typed on the command line replaces the selection's one for the same key
    assert apply_selection([f"selection={path}", "category=b", "coreset.ratio=0.1"])[-1] == "coreset.ratio=0.1"


def test_selection_file_errors_name_the_fix(tmp_path):
    path = tmp_path / "selection.json"
    with pytest.raises(ValueError, match="no such file"):
        apply_selection([f"selection={path}"])
    path.write_text(json.dumps({"format": "patchcore-selection", "version": 1, "complete": True,
                                "chosen": {"a": ["coreset.ratio=0.01"], "b": ["coreset.ratio=0.1"]}}))
    with pytest.raises(ValueError, match="run each category on its own.*category=a.*category=b"):
        apply_selection([f"selection={path}"])  # category=all, chosen differently
    with pytest.raises(ValueError, match="no choice for category c"):
        apply_selection([f"selection={path}", "category=c"])
    assert apply_selection([f"selection={path}", "category=[a]"]) == ["coreset.ratio=0.01", "category=[a]"]
    for bad, message in ((["hydra.run.dir=x"], "may not set"), (["num_neighbors"], "not a main.py override"),
                         (["patchcore.num_neighbors=3"], "renamed patchcore.scoring.num_neighbors")):
        path.write_text(json.dumps({"format": "patchcore-selection", "version": 1, "complete": True,
                                    "chosen": {"a": bad}}))
        with pytest.raises(ValueError, match=message):
            apply_selection([f"selection={path}", "category=a"])
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a selection file"):
        apply_selection([f"selection={path}"])


def test_score_run_scores_a_finished_runs_config_and_leaves_it_untouched(tmp_path, data, no_test_reads):
    root = data
    run = tmp_path / "finished"
    (run / ".hydra").mkdir(parents=True)
    overrides = [*BASE, f"dataset.root={root}", "backbone.layers=[layer1]", "category=stripes"]
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with initialize_config_dir(CONF, version_base="1.3"):
        from experiments.harness.run_key import config_hash

        results = {"config_hash": config_hash(compose("config", overrides=overrides)),
                   "categories": {"stripes": {}}}
        (run / "results.json").write_text(json.dumps(results))
        cfg = compose("select", overrides=[])
        with open_dict(cfg):
            cfg.select.holdout = 0.25
        record = sel.score_run(cfg, run, tmp_path / "select", lambda o: compose("config", overrides=o))
    selected = _run(root, tmp_path / "sel", LAYERS)
    scored = record["categories"]["stripes"]
    same = next(e for e in selected["categories"]["stripes"]["candidates"] if e["name"] == "backbone.layers=[layer1]")
    assert scored["score"] == pytest.approx(same["score"], abs=1e-9)  # the same proxy, the same number
    assert json.loads((run / "results.json").read_text()) == results
    assert json.loads((tmp_path / "select" / "score_run.json").read_text())["mean_score"] == scored["score"]
    (run / ".hydra" / "overrides.yaml").write_text("- patchcore._target_=os.system\n")
    with pytest.raises(ValueError, match="may not set"):
        sel.run_overrides(run)


def test_no_entry_point_shadows_the_standard_library():
    # `python experiments/<x>.py` puts experiments/ first on sys.path: an experiments/select.py broke every entry
    # point (logging imports the standard library's select), hence experiments/selection.py
    import sys

    scripts = {path.stem for path in (Path(__file__).resolve().parents[1] / "experiments").glob("*.py")}
    assert "selection" in scripts and not scripts & set(sys.stdlib_module_names)


# ------------------------------------------------------------------ one model build shared with main.py


def _compose_main(overrides: list[str]):
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_a_fixed_input_size_backbone_gets_its_crop_in_selection_as_in_main(tmp_path, monkeypatch, data):
    # A backbone with fixed position embeddings (CLIP ViT @336) dictates the crop; a resnet18 told it has a fixed
    # 64 px input stands in for one. main.py's Harness and selection's proxy score share the build, so both fit
    # 64 px crops (resize round(64 * 256 / 224) = 73), not the dataset's 48.
    from core.backbones import TorchvisionCNN
    from experiments.harness.fit_and_evaluate import Harness
    from experiments.harness.selection_scoring import proxy_score, proxy_settings

    monkeypatch.setattr(TorchvisionCNN, "input_size", 64, raising=False)
    shapes: list[tuple] = []
    real_fit = PatchCore.fit
    monkeypatch.setattr(PatchCore, "fit", lambda self, batches, *a, **k: (
        shapes.append(tuple(next(iter(batches))["image"].shape[-2:])), real_fit(self, batches, *a, **k))[1])
    cfg = _compose_main([*BASE, f"dataset.root={data}", "category=stripes"])
    harness = Harness(cfg, tmp_path / "main")
    assert (harness.layout.image_size, harness.layout.resize) == (64, 73)
    with initialize_config_dir(CONF, version_base="1.3"):
        proxy = proxy_settings({**compose("select").select, "holdout": 0.25})
    row = proxy_score(cfg, "stripes", proxy, None)
    assert row["image_size"] == 64 and shapes == [(64, 64)] and (row["n_fit"], row["n_held_out"]) == (6, 2)


def _checkpoint(path: Path, seed: int, category: str, layers: tuple[str, ...] = ("layer1",)) -> Path:
    """A fine-tuned checkpoint as extensions/training.py writes it (its payload), with seeded random weights."""
    from core.backbones import TorchvisionCNN
    from extensions.checkpoint import FORMAT_VERSION, save_torch

    torch.manual_seed(seed)
    extractor = TorchvisionCNN("resnet18", list(layers), pretrained=False, name="resnet18")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_torch(path, {"format_version": FORMAT_VERSION, "method": "rotation", "category": category,
                             "base": {"name": extractor.name, **extractor.spec()}, "step": 0,
                             "state_dict": extractor.state_dict()})


FINETUNED = ["backbone=finetuned", "backbone.method=rotation", "backbone.base=resnet18"]


def test_a_per_category_checkpoint_resolves_per_category_in_selection(tmp_path, monkeypatch, data):
    from extensions.checkpoint import FineTunedBackbone

    _stripes(data, name="stripes2")
    for seed, category in enumerate(("stripes", "stripes2")):
        _checkpoint(tmp_path / "ckpt" / f"{category}.pt", seed, category)
    loaded: list[str] = []
    real_init = FineTunedBackbone.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        loaded.append(self.checkpoint.name)

    monkeypatch.setattr(FineTunedBackbone, "__init__", spy)
    space = {"combine": "one_at_a_time", "axes": {"k": [["patchcore.scoring.num_neighbors=3"]]}}
    base = [o for o in BASE if o != "backbone=resnet18" and not o.startswith("backbone.pretrained")]
    task = [*base, f"dataset.root={data}", *FINETUNED, f"backbone.checkpoint={tmp_path}/ckpt/${{category}}.pt"]
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("select", overrides=task)
        with open_dict(cfg):
            cfg.select.space, cfg.select.holdout = space, 0.25
        record = sel.run_selection(cfg, tmp_path / "run", task, lambda o: compose("config", overrides=o), "test")
    assert loaded == ["stripes.pt", "stripes.pt", "stripes2.pt", "stripes2.pt"]  # 2 candidates per category
    assert sorted(record["categories"]) == ["stripes", "stripes2"]
    assert all(e["score"] is not None for c in record["categories"].values() for e in c["candidates"])


# ------------------------------------------------------------------ successive halving

from experiments.harness.selection_halving import Halving, planned, rung_sizes, survivors  # noqa: E402


def test_rung_sizes_and_survivors_by_hand():
    h = Halving(eta=3, min_train_images=8)
    assert rung_sizes(9, 30, h) == [10, None]  # 9 -> 3 on 30 // 3 images, then 3 on all 30
    assert rung_sizes(10, 30, h) == [8, 10, None]  # 10 -> 4 -> 2: 30 // 9 = 3 raised to 8, 30 // 3, all
    assert rung_sizes(3, 30, h) == [None] and rung_sizes(9, 30, None) == [None]  # 3 <= eta: the grid
    assert rung_sizes(9, 8, h) == [None, None]  # too few images for a subset: both rungs on all (scored once)
    assert survivors([0, 1, 2, 3], {0: 0.5, 1: 0.9, 2: 0.5, 3: 0.7}, 3) == [1, 3]  # ceil(4 / 3) = 2, in order
    assert survivors([0, 1, 2, 3], {0: 0.5, 1: 0.9, 2: 0.5, 3: None}, 3) == [0, 1]  # tie 0 / 2: the earlier
    assert survivors([4, 6, 7], {4: None, 6: None, 7: 0.1}, 2) == [7]  # no finite score: never goes on
    assert survivors([0, 1, 2, 3], {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7}, 3, keep=0) == [0, 1, 3]  # the base goes on
    assert survivors([0, 1, 2, 3], {0: 0.95, 1: 0.9, 2: 0.5, 3: 0.7}, 3, keep=0) == [0, 1]  # among the best anyway
    assert survivors([0, 1], {0: None, 1: 0.9}, 3, keep=0) == [1]  # a base without a score does not
    for bad in ({"eta": 1, "min_train_images": 8}, {"eta": 3, "min_train_images": 0},
                {"eta": 2.5, "min_train_images": 8}, {"rate": 3}, {"eta": 3}, 3):
        with pytest.raises(ValueError, match="select.halving"):
            Halving.from_node(bad)
    assert Halving.from_node(None) is None and Halving.from_node(False) is None


HALVING = {"eta": 3, "min_train_images": 2}
FOUR = {"combine": "one_at_a_time", "axes": {"k": [["patchcore.scoring.num_neighbors=3"]]},
        "layers": {"resnet18": [["backbone.layers=[layer3]"], ["backbone.layers=[layer1]"]]}}  # 4 candidates


def _fit_sizes(monkeypatch, interrupt_at: int | None = None) -> list[int]:
    """The training images of every PatchCore fit from here on; Ctrl-C at fit number ``interrupt_at``."""
    sizes: list[int] = []
    real_fit = PatchCore.fit

    def counted(self, batches, *args, **kwargs):
        sizes.append(len(batches.dataset))
        if len(sizes) == interrupt_at:
            raise KeyboardInterrupt
        return real_fit(self, batches, *args, **kwargs)

    monkeypatch.setattr(PatchCore, "fit", counted)
    return sizes


def test_halving_finds_the_known_best_and_carries_the_base_to_the_whole_part(tmp_path, monkeypatch, data,
                                                                            no_test_reads):
    # 8 train/good, 2 held out: a training part of 6. 4 candidates, eta 3: rung 0 fits all 4 on 6 // 3 = 2 images
    # and keeps ceil(4 / 3) = 2, plus the base (the run's own configuration), which is not among them here: rung 1
    # fits 3 on all 6. 4*2 + 3*6 = 26 candidate-images (the grid: 4*6 = 24; halving saves on real spaces, see
    # test_halving_budget_of_the_default_space_by_hand).
    sizes = _fit_sizes(monkeypatch)
    grid = _run(data, tmp_path / "grid", FOUR, halving=None)
    assert sizes == [6, 6, 6, 6]  # halving=null: the plain grid, every candidate on the whole training part
    sizes.clear()
    halved = _run(data, tmp_path / "halved", FOUR, halving=HALVING)
    assert sizes == [2, 2, 2, 2, 6, 6, 6] and halved["planned_fit_images"] == sum(sizes) == 26
    assert grid["planned_fit_images"] == 24
    node, grid_node = halved["categories"]["stripes"], grid["categories"]["stripes"]
    assert node["rungs"] == [{"candidates": 4, "n_fit": 2}, {"candidates": 3, "n_fit": 6}]
    assert node["chosen"] == grid_node["chosen"] == "layers:backbone.layers=[layer1]"
    assert halved["chosen"] == grid["chosen"] and halved["halving"] == HALVING and grid["halving"] is None
    entries = {e["name"]: e for e in node["candidates"]}
    first = sorted(entries, key=lambda n: -entries[n]["rungs"][0]["score"])[:2]  # the best 2 of rung 0 go on
    assert "base" not in first
    going_on = {*first, "base"}
    assert {n for n, e in entries.items() if e["rung"] == 1} == going_on
    for name, entry in entries.items():
        assert [r["n_fit"] for r in entry["rungs"]] == ([2, 6] if name in going_on else [2])
        last = entry["rungs"][-1]
        assert (entry["score"], entry["image_auroc"], entry["n_fit"], entry["key"]) == (
            last["score"], last["image_auroc"], last["n_fit"], last["key"])  # the entry is its last rung
    for entry in grid_node["candidates"]:  # grid: one rung on the whole part, the same score halving's last has
        assert entry["rung"] == 0 and [r["n_fit"] for r in entry["rungs"]] == [6]
        if entry["name"] in going_on:
            assert entries[entry["name"]]["score"] == pytest.approx(entry["score"], abs=1e-9)
            assert entries[entry["name"]]["key"] == entry["key"]  # a whole-part score has one key, either way


def test_halving_budget_of_the_default_space_by_hand() -> None:
    """13 candidates, 80 training images, eta 3: rungs of 80 // 9 = 8, 80 // 3 = 26 and 80 images; 13, then
    ceil(13 / 3) + the base = 6, then ceil(6 / 3) + the base = 3 candidates: 104 + 156 + 240 = 500 candidate-images,
    against the grid's 13 * 80 = 1040."""
    halving = Halving(eta=3, min_train_images=8)
    sizes = rung_sizes(13, 80, halving)
    assert sizes == [8, 26, None]
    rungs = planned(13, sizes, 80, 3, keep=True)
    assert rungs == [{"candidates": 13, "n_fit": 8}, {"candidates": 6, "n_fit": 26}, {"candidates": 3, "n_fit": 80}]
    assert sum(r["candidates"] * r["n_fit"] for r in rungs) == 500


def test_an_interrupted_halving_run_resumes_without_refitting(tmp_path, monkeypatch, data, no_test_reads):
    sizes = _fit_sizes(monkeypatch, interrupt_at=5)  # Ctrl-C at the first fit of rung 1
    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path / "run", FOUR, halving=HALVING)
    partial = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert partial["complete"] is False
    assert [e["rung"] for e in partial["categories"]["stripes"]["candidates"]] == [0, 0, 0, 0]
    sizes.clear()
    resumed = _run(data, tmp_path / "run", FOUR, halving=HALVING)
    assert sizes == [6, 6, 6]  # rung 0 taken over; only rung 1's three fits (its best two and the base)
    node = resumed["categories"]["stripes"]
    assert node["chosen"] == "layers:backbone.layers=[layer1]" and resumed["complete"]
    before = {e["name"]: e["rungs"][0] for e in partial["categories"]["stripes"]["candidates"]}
    assert all(e["rungs"][0] == before[e["name"]] and e["resumed"] for e in node["candidates"])


# ------------------------------------------------------------------ backbones and fine-tuned checkpoints


def test_layers_options_apply_per_candidate_backbone():
    from experiments.harness.selection_space import candidates

    tuned = ("backbone=finetuned", "backbone.method=rotation", "backbone.checkpoint=c/${category}.pt")
    space = {"axes": {"k": [["patchcore.scoring.num_neighbors=1"], ["patchcore.scoring.num_neighbors=3"]]},
             "layers": {"resnet18": [["backbone.layers=[layer1]"]],
                        "wrn50": [["backbone.layers=[layer2]"], ["backbone.layers=[layer3]"]]},
             "backbones": [[], ["backbone=wrn50"], list(tuned)]}
    keys = {(): "resnet18", ("backbone=wrn50",): "wrn50", tuned: None}  # a fine-tuned one: its checkpoint's layers
    grid = candidates({**space, "combine": "grid"}, keys)
    by_backbone = {b: [c.overrides[len(b):] for c in grid if c.backbone == b] for b in keys}
    assert by_backbone[()] == [["patchcore.scoring.num_neighbors=1", "backbone.layers=[layer1]"],
                               ["patchcore.scoring.num_neighbors=3", "backbone.layers=[layer1]"]]
    assert len(by_backbone[("backbone=wrn50",)]) == 4 and len(by_backbone[tuned]) == 2 and len(grid) == 8
    assert ["patchcore.scoring.num_neighbors=3", "backbone.layers=[layer2]"] in by_backbone[("backbone=wrn50",)]
    one = candidates({**space, "combine": "one_at_a_time"}, keys)  # each backbone option at its own layers
    assert [c.name for c in one] == ["base", "k:patchcore.scoring.num_neighbors=1",
                                     "k:patchcore.scoring.num_neighbors=3", "layers:backbone.layers=[layer1]",
                                     "backbone:backbone=wrn50", f"backbone:{' '.join(tuned)}"]
    with pytest.raises(ValueError, match=r"must choose one: backbone=<name>"):
        candidates({"backbones": [["backbone.layers=[layer1]"]]}, {})


def test_the_shipped_default_space_lists_13_distinct_candidates_for_effnet_lite0():
    from omegaconf import OmegaConf

    from experiments.harness.selection_halving import planned
    from experiments.harness.selection_space import backbone_options, candidates

    space = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "select" / "space" / "default.yaml"), resolve=False)
    options = backbone_options(space)
    assert options[3][-1] == "backbone.checkpoint=checkpoints/rotation/effnet_lite0/${category}.pt"  # kept as typed
    keys = {(): "effnet_lite0", options[0]: "effnet_lite0", options[1]: "resnet18", options[2]: "wrn50",
            options[3]: None, options[4]: None}
    found = candidates(space, keys)
    # base, 2 image sizes, num_neighbors, patch_size, 2 coreset ratios, 2 layer choices, 5 backbones; the
    # backbone=effnet_lite0 option composes the base config again (scored once): 13 distinct
    assert len(found) == 14 and found[-5].overrides == ["backbone=effnet_lite0"]
    shipped = Halving.from_node(OmegaConf.to_container(OmegaConf.load(Path(CONF) / "select.yaml").select.halving))
    assert shipped == Halving(eta=3, min_train_images=8)
    sizes = rung_sizes(13, 200, shipped)
    assert sizes == [22, 66, None]  # 13 -> 5 -> 2: 200 // 9, 200 // 3, all 200
    cost = sum(r["candidates"] * r["n_fit"] for r in planned(13, sizes, 200, 3))
    assert cost == 13 * 22 + 5 * 66 + 2 * 200 == 1016  # about 5 whole-part fits instead of 13


def test_a_missing_checkpoint_is_skipped_with_its_reason_and_a_present_one_is_scored(tmp_path, data, caplog,
                                                                                     no_test_reads):
    _checkpoint(tmp_path / "ckpt" / "stripes.pt", 0, "stripes")
    present = [*FINETUNED, f"backbone.checkpoint={tmp_path}/ckpt/${{category}}.pt"]
    missing = [*FINETUNED, f"backbone.checkpoint={tmp_path}/nowhere/${{category}}.pt"]
    space = {"combine": "one_at_a_time", "axes": {}, "backbones": [present, missing]}
    with caplog.at_level("WARNING", logger="select"):
        record = _run(data, tmp_path / "run", space)
    node = record["categories"]["stripes"]
    assert [e["name"] for e in node["candidates"]] == ["base", f"backbone:{' '.join(present)}"]
    assert all(e["score"] is not None and e["n_fit"] == 6 for e in node["candidates"])
    [skipped] = node["skipped"]
    assert skipped["name"] == f"backbone:{' '.join(missing)}"
    assert skipped["reason"].startswith("weights not available: MissingCheckpointError: no rotation checkpoint "
                                        "for category 'stripes'")
    assert f"{tmp_path}/nowhere/stripes.pt does not exist" in skipped["reason"]  # ${category} resolved per category
    assert f"skipped backbone option {' '.join(missing)}" in caplog.text
    assert node["candidates"][1]["overrides"] == present
    # what main.py runs for it: the command's overrides less its backbone (backbone=resnet18,
    # backbone.pretrained=false), then the option's; ${category} left for main.py to resolve
    from experiments.harness.selection_space import Candidate, with_base

    whole = with_base([*BASE, f"dataset.root={data}"], Candidate("x", present, tuple(present)))
    assert whole == [o for o in [*BASE, f"dataset.root={data}"] if not o.startswith("backbone")] + present
