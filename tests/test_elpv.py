"""dataset=elpv: the layout of the ELPV solar cells (seeded split of the nominal cells, uncertain cells as their
own defect types), the main metrics without the uncertain cells, and a run's record (image metrics only).

The fast tests read a small ELPV-format folder (labels.csv + grey PNGs) written here; only the label counts of the
installed package are read for real (no image decoding), and one slow run fits on the real cells."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import roc_auc_score

from core.data import AnomalyDataset, DatasetError, ElpvLayout, Preprocessing
from core.data import elpv as elpv_module
from core.data.elpv import UNCERTAIN_TYPES, package_root, read_labels, split_nominal
from core.detector import Predictions
from experiments.harness.evaluation import evaluate
from experiments.harness.fit_and_evaluate import run
from experiments.reporting.data import Run
from experiments.reporting.figures import _read_scores

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
# cells per (type, probability) of the small folder: 29 cells, both types, every probability
SMALL = {("mono", "0.0"): 10, ("mono", "1.0"): 3, ("mono", "0.3333333333333333"): 2, ("mono", "0.6666666666666666"): 1,
         ("poly", "0.0"): 8, ("poly", "1.0"): 2, ("poly", "0.3333333333333333"): 1, ("poly", "0.6666666666666666"): 2}


def write_elpv(root: Path, size: int = 48) -> dict[str, tuple[str, str]]:
    """An ELPV-format folder (the package's labels.csv format, grey PNGs); returns name -> (type, probability).
    Defective cells have a dark crack-like bar, uncertain ones a fainter one, so a model can tell them apart."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines, truth, number = [], {}, 0
    cells = [key for key, count in SMALL.items() for _ in range(count)]
    for index in rng.permutation(len(cells)):  # types and probabilities interleaved in file order, as in the package
        category, probability = cells[index]
        number += 1
        name = f"cell{number:04d}.png"
        pixels = (rng.random((size, size)) * 40 + 100).astype(np.uint8)
        pixels[size // 2 - 2: size // 2 + 2, 4:-4] -= np.uint8(round(90 * float(probability)))
        Image.fromarray(pixels).save(root / "images" / name)  # mode L, as the package's cells
        lines.append(f"images/{name}  {probability:<20}{category}")
        truth[name] = (category, probability)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return truth


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    return tmp_path / "elpv", write_elpv(tmp_path / "elpv")


def names(samples) -> list[str]:
    return [Path(s.path).name for s in samples]


# --------------------------------------------------------------------------- layout and split


def test_split_and_types_counted_by_hand(small) -> None:
    root, truth = small
    layout = ElpvLayout(root=root, test_fraction=0.3, split_seed=0)
    assert layout.resolve_categories("all") == ["mono", "poly"]
    # mono: 10 nominal -> round(3.0) = 3 test, 7 train; poly: 8 nominal -> round(2.4) = 2 test, 6 train
    for category, (n_train, n_good, n_bad, n_13, n_23) in {"mono": (7, 3, 3, 2, 1), "poly": (6, 2, 2, 1, 2)}.items():
        train, test = layout.train_samples(category), layout.test_samples(category)
        assert len(train) == n_train and {s.label for s in train} == {0}
        assert Counter(s.defect_type for s in test) == {"good": n_good, "defective": n_bad, "uncertain_1_3": n_13,
                                                       "uncertain_2_3": n_23}
        assert all(s.mask_path is None for s in [*train, *test])  # image labels only
        assert {s.label for s in test if s.defect_type != "good"} == {1}
        nominal = {n for n, (c, p) in truth.items() if c == category and p == "0.0"}
        assert set(names(train)).isdisjoint(names(test))  # disjoint, and together every nominal cell
        assert set(names(train)) | {n for s, n in zip(test, names(test)) if s.label == 0} == nominal
        # each defect type holds exactly the cells of its probability
        for defect, probability in (("defective", "1.0"), ("uncertain_1_3", "0.3333333333333333"),
                                    ("uncertain_2_3", "0.6666666666666666")):
            assert {n for s, n in zip(test, names(test)) if s.defect_type == defect} == {
                n for n, (c, p) in truth.items() if c == category and p == probability}


def test_mono_and_poly_are_separate(small) -> None:
    root, truth = small
    layout = ElpvLayout(root=root)
    for category in ("mono", "poly"):
        listed = names(layout.train_samples(category)) + names(layout.test_samples(category))
        assert len(listed) == len(set(listed)) == sum(n for (c, _), n in SMALL.items() if c == category)
        assert {truth[n][0] for n in listed} == {category}
    assert ElpvLayout(root=root, categories=["poly"]).resolve_categories("all") == ["poly"]


def test_split_is_seeded_by_split_seed_not_by_the_run_seed(small) -> None:
    root, _ = small
    first, again, other = (ElpvLayout(root=root, split_seed=s) for s in (0, 0, 1))
    assert names(first.test_samples("mono")) == names(again.test_samples("mono"))
    assert names(first.test_samples("mono")) != names(other.test_samples("mono"))  # 120 possible 3-of-10 splits
    assert names(first.train_samples("mono", seed=0)) == names(first.train_samples("mono", seed=7))
    # train_limit draws from the split's training cells with the run's seed; the test never changes
    limited = ElpvLayout(root=root, train_limit=3)
    draws = {tuple(names(limited.train_samples("mono", seed=s))) for s in range(4)}
    assert len(draws) > 1 and all(len(d) == 3 and set(d) <= set(names(first.train_samples("mono"))) for d in draws)
    assert names(limited.test_samples("mono")) == names(first.test_samples("mono"))


def test_split_nominal_takes_the_rounded_fraction() -> None:
    paths = [Path(f"{i}.png") for i in range(20)]
    train, test = split_nominal(paths, 0.25, seed=3)
    assert (len(train), len(test)) == (15, 5) and sorted(train + test) == sorted(paths)
    assert train == [p for p in paths if p in train]  # each side keeps the file order


def test_grey_cells_become_three_equal_channels(small) -> None:
    root, _ = small
    pre = Preprocessing(48, 48)
    item = AnomalyDataset(ElpvLayout(root=root).test_samples("poly"), pre)[0]
    image = item["image"]
    assert image.shape == (3, 48, 48)
    mean, std = np.array(pre.mean)[:, None, None], np.array(pre.std)[:, None, None]
    pixels = image.numpy() * std + mean  # undo the per-channel normalisation
    assert np.allclose(pixels[0], pixels[1], atol=1e-5) and np.allclose(pixels[0], pixels[2], atol=1e-5)


# --------------------------------------------------------------------------- errors, named in seconds


def test_bad_settings_and_files_are_named(small, tmp_path, monkeypatch) -> None:
    root, _ = small
    with pytest.raises(DatasetError, match=r"dataset.test_fraction=1.0 must be in \(0, 1\)"):
        ElpvLayout(root=root, test_fraction=1.0)
    with pytest.raises(DatasetError, match=r"test_fraction=0.01 puts 0 of 10 nominal cells"):
        ElpvLayout(root=root, test_fraction=0.01).test_samples("mono")
    with pytest.raises(DatasetError, match=r"unknown elpv categories \['cdte'\]"):
        ElpvLayout(root=root, categories=["cdte"])
    with pytest.raises(DatasetError, match="labels.csv does not exist"):
        ElpvLayout(root=tmp_path / "nowhere").train_samples("mono")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.csv").write_text("images/cell0001.png  0.0  mono\nimages/cell0002.png  0.5  mono\n")
    with pytest.raises(DatasetError, match=r"labels.csv, line 2: probability 0.5"):
        read_labels(bad / "labels.csv")
    monkeypatch.setattr(elpv_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="make install"):
        ElpvLayout()


# --------------------------------------------------------------------------- the installed package


def test_config_reads_the_installed_package_counts() -> None:
    """The package's labels (not its images): the counts of the ELPV paper, 1,508 functional cells, 295 at 1/3,
    106 at 2/3 and 715 defective, split by type as listed in its labels.csv."""
    layout = instantiate(OmegaConf.load(CONF / "elpv.yaml"))
    assert isinstance(layout, ElpvLayout) and layout.root == package_root()
    assert (layout.resize, layout.image_size, layout.test_fraction, layout.split_seed) == (224, 224, 0.3, 0)
    counts = Counter((c.category, c.probability) for c in read_labels(layout.root / "labels.csv"))
    assert counts == {("mono", 0.0): 588, ("mono", 1 / 3): 117, ("mono", 2 / 3): 56, ("mono", 1.0): 313,
                      ("poly", 0.0): 920, ("poly", 1 / 3): 178, ("poly", 2 / 3): 50, ("poly", 1.0): 402}
    # test_fraction 0.3: round(176.4) = 176 and round(276.0) = 276 nominal test cells
    assert [len(layout.nominal_split(c)[1]) for c in ("mono", "poly")] == [176, 276]
    assert [len(layout.nominal_split(c)[0]) for c in ("mono", "poly")] == [412, 644]


# --------------------------------------------------------------------------- main metrics without the uncertain cells


def test_uncertain_types_are_out_of_the_main_metrics() -> None:
    types = ["good"] * 4 + ["defective"] * 3 + ["uncertain_1_3"] * 2 + ["uncertain_2_3"] * 2
    labels = np.array([0 if t == "good" else 1 for t in types])
    # defective scores high; uncertain ones mostly below the nominal ones, so including them would change the AUROC
    scores = np.array([0.1, 0.4, 0.3, 0.2, 0.9, 0.35, 0.8, 0.05, 0.25, 0.15, 0.5])
    n = len(types)
    predictions = Predictions(scores, np.zeros((n, 4, 4), np.float32), labels, np.zeros((n, 4, 4), bool),
                              labels == 0, [f"{i}.png" for i in range(n)], types)
    metrics, note = evaluate(predictions, UNCERTAIN_TYPES)
    main = np.isin(types, ["good", "defective"])
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels[main], scores[main]))
    assert metrics["image_auroc"] == pytest.approx(11 / 12)  # by hand: 0.35 beats 3 of the 4 nominal scores
    assert metrics["image_auroc"] != pytest.approx(roc_auc_score(labels, scores))
    # uncertain_1_3 (0.05, 0.25) against the nominal (0.1, 0.4, 0.3, 0.2): 0 + 2 of 8 pairs;
    # uncertain_2_3 (0.15, 0.5): 1 + 4 of 8 pairs
    assert metrics["excluded_from_main_metrics"] == {
        "uncertain_1_3": {"image_auroc": pytest.approx(2 / 8), "n_images": 2, "n_nominal": 4},
        "uncertain_2_3": {"image_auroc": pytest.approx(5 / 8), "n_images": 2, "n_nominal": 4}}
    assert all(metrics[key] is None for key in ("pixel_auroc", "pixel_f1_max", "aupro", "aupro_defect_images"))
    assert note == "no ground-truth masks: pixel metrics not computed"
    assert "excluded_from_main_metrics" not in evaluate(predictions)[0]  # datasets without such types: as before


TINY = ("dataset=elpv", "dataset.resize=48", "dataset.image_size=48", "backbone=resnet18", "backbone.pretrained=false",
        "patchcore.embedder.embed_dim=64", "coreset.ratio=0.5", "logger=none", "viz.n=2")


def test_run_records_image_metrics_only_and_the_uncertain_aurocs(small, tmp_path, make_config) -> None:
    root, _ = small
    cfg = make_config(*TINY, f"dataset.root={root}", "category=all", "threshold=f1_optimal")
    results = run(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    with (tmp_path / "run" / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert on_disk["complete"] and set(on_disk["categories"]) == {"mono", "poly"}
    for category, n_test in (("mono", 9), ("poly", 7)):
        entry = on_disk["categories"][category]
        mine = [r for r in rows if r["category"] == category]
        assert entry["n_test"] == len(mine) == n_test  # every cell scored, the uncertain ones included
        main = [r for r in mine if r["defect_type"] in ("good", "defective")]
        assert entry["image_auroc"] == pytest.approx(
            roc_auc_score([int(r["label"]) for r in main], [float(r["image_score"]) for r in main]))
        for defect in UNCERTAIN_TYPES:
            chosen = [r for r in mine if r["defect_type"] in ("good", defect)]
            assert entry["excluded_from_main_metrics"][defect] == {
                "image_auroc": pytest.approx(roc_auc_score([int(r["label"]) for r in chosen],
                                                           [float(r["image_score"]) for r in chosen])),
                "n_images": len(chosen) - sum(r["defect_type"] == "good" for r in chosen),
                "n_nominal": sum(r["defect_type"] == "good" for r in chosen)}
        confusion = entry["threshold"]["confusion"]  # decisions over the main images only
        assert sum(confusion.values()) == len(main)
        assert all(entry[key] is None for key in ("pixel_auroc", "pixel_f1_max", "aupro", "aupro_defect_images"))
        assert entry["pixel_metrics_note"] == "no ground-truth masks: pixel metrics not computed"
    assert on_disk["mean"]["pixel_auroc"] is None and on_disk["mean"]["image_auroc"] == pytest.approx(
        (on_disk["categories"]["mono"]["image_auroc"] + on_disk["categories"]["poly"]["image_auroc"]) / 2)
    assert results["config"]["dataset"]["test_fraction"] == 0.3
    # the report's ROC curves read the same main images
    labels, scores = _read_scores(Run(tmp_path / "run", on_disk, None), "mono")
    assert len(labels) == sum(r["category"] == "mono" and r["defect_type"] in ("good", "defective") for r in rows)


@pytest.mark.slow
def test_real_cells_end_to_end(tmp_path, make_config) -> None:
    """A PatchCore run on the real mono cells (100 training cells drawn, a 1 % bank, every test cell): the counts of
    the split, image metrics only, better than chance on real defects."""
    cfg = make_config("dataset=elpv", "category=mono", "dataset.train_limit=100", "coreset.ratio=0.01",
                      "logger=none", "viz.n=0")
    entry = run(cfg, tmp_path / "run")["categories"]["mono"]
    assert entry["n_train"] == 100 and entry["n_test"] == 176 + 313 + 117 + 56
    assert 0.6 < entry["image_auroc"] <= 1.0 and entry["pixel_auroc"] is None
    assert set(entry["excluded_from_main_metrics"]) == set(UNCERTAIN_TYPES)
