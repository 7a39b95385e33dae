"""The paper's figures as a reader sees them (issue 30): ROC curves that stay apart, anomaly-map grids on one
colour scale with a colour bar, sweep axes in words on every panel, categorical sweeps as points, and the
fine-tuning diagnostics in the appendix with their axes in words and constant series left out."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments.reporting import figures as pf
from experiments.reporting import map_figures as mf
from experiments.reporting.comparisons import Arm, Comparison, load
from experiments.reporting.data import Run
from experiments.reporting.finetune_figures import _quantities, _step_panels
from experiments.reporting.paper_appendix import DIAGNOSTICS, diagnostics_blocks
from experiments.reporting.paper_sections import figure_blocks
from extensions.checkpoint import FineTunedBackbone
from tests.conftest import CONF_DIR
from tests.test_report import write_run

BASE = {"bottle": 0.90, "screw": 0.80}   # screw: the baseline's hardest category
ARMS = {"baseline": ((), BASE), "cosine": (("patchcore.scoring.distance=cosine",), {"bottle": 0.95, "screw": 0.85}),
        "channel": (("patchcore.embedder.aggregation=channel_mean",), {"bottle": 1.0, "screw": 1.0})}


def _config(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["dataset=mvtec", "dataset.root=/data/mvtec", "backbone=effnet_lite0",
                                            *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Arms of a comparison (10 nominal + 10 defective test images per category: scores.csv gives exactly the
    AUROCs above; nominal image i scores i / 10, so the highest nominal score is 0.9) with saved maps (score
    0.5), a numeric sweep (coreset ratio) and a categorical one (layer sets)."""
    root = tmp_path_factory.mktemp("runs")
    for name, (overrides, aurocs) in ARMS.items():
        write_run(root / name, _config, overrides, aurocs, maps=True, images=10)
    for ratio in (0.01, 0.25):
        write_run(root / f"ratio{ratio}", _config, (f"coreset.ratio={ratio}",), BASE, images=10)
    for layers in ("[blocks.3]", "[blocks.3,blocks.5]"):
        write_run(root / layers, _config, (f"backbone.layers={layers}",), BASE, images=10)
    return root


def _comparison(runs: Path, key: str) -> Comparison:
    return next(c for c in load([runs]).comparisons if c.name == key)


def test_roc_curves_of_each_arm_differ_in_colour_and_dash_and_name_their_auroc(runs) -> None:
    distance, aggregation = (_comparison(runs, key) for key in ("patchcore_scoring_distance",
                                                                "patchcore_embedder_aggregation"))
    groups = [*pf.arms(distance), *pf.arms(aggregation)[1:]]  # baseline, cosine, channel
    built = pf.roc_figure(groups, ["bottle", "screw"])
    panels = built[0].figure.axes[:2]
    for ax, category in zip(panels, ("bottle", "screw")):
        lines = [line for line in ax.get_lines() if line.get_color() != "0.7"]  # not the chance diagonal
        assert len(lines) == 3
        assert len({line.get_color() for line in lines}) == 3
        assert len({str(line.get_linestyle()) for line in lines}) == 3
        assert len({line.get_marker() for line in lines}) == 3
        assert ax.get_xlim()[0] < 0  # a curve up the left axis (AUROC 100) is not hidden by the spine
        # each arm's AUROC in its panel, in its colour, as scores.csv gives it (channel: 100, a curve along the axes)
        shown = {text.get_color(): float(text.get_text()) for text in ax.texts}
        wanted = [100 * ARMS[name][1][category] for name in ("baseline", "cosine", "channel")]
        assert [shown[line.get_color()] for line in lines] == pytest.approx(wanted)
    plt.close(built[0].figure)


def test_map_grid_has_a_colour_bar_and_scores_scaled_to_the_nominal_images(runs) -> None:
    comparison = _comparison(runs, "patchcore_scoring_distance")
    assert mf.hardest(comparison) == ["screw", "bottle"]  # the baseline's lowest image AUROC first
    [figure] = mf.gallery_figure(comparison, pf.arms(comparison), "maps_x")
    fig = figure.figure
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "map / highest nominal image score"]
    assert len(bars) == 1
    maps = [ax for ax in fig.axes if ax.images and ax.get_xlabel().startswith("score")]
    # the saved score 0.5 over the highest nominal score 0.9 of its run's scores.csv
    assert {ax.get_xlabel() for ax in maps} == {f"score {0.5 / 0.9:.2f}"}
    # the map itself on the same scale: the saved map divided by 0.9, and one colour range for every panel
    record = mf.load_maps(runs / "baseline" / "maps" / "screw")[0]
    first = next(ax for ax in maps if np.allclose(ax.images[0].get_array(), record["map"] / 0.9, atol=1e-3))
    assert {ax.images[0].get_clim() for ax in maps} == {first.images[0].get_clim()}
    rows = [ax.get_ylabel().split("\n")[0] for ax in fig.axes if ax.get_ylabel() and ax not in bars]
    assert rows == ["screw", "screw", "bottle", "bottle"]
    assert "lowest" in figure.caption and "highest image score among its run's nominal test images" in figure.caption
    plt.close(fig)


def test_map_grid_without_masks_has_no_ground_truth_column() -> None:
    """ELPV has image labels only: its grid shows the image and the maps, no empty ground-truth panel."""
    record = {"image": np.zeros((8, 8, 3), np.uint8), "map": np.ones((8, 8), np.float32), "mask": np.zeros((8, 8)),
              "has_mask": False, "label": 1, "score": 1.2, "path": "/cells/1.png", "defect_type": "defective"}
    fig = mf.map_grid([("poly", "/cells/1.png")], {"baseline": {"/cells/1.png": record}})
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "baseline"]
    plt.close(fig)


def test_sweep_axes_are_labelled_in_words_on_every_panel(runs) -> None:
    for key, words in (("coreset_ratio", "coreset ratio"), ("backbone_layers", "feature layers")):
        [figure] = pf.sweep_figure(_comparison(runs, key))
        panels = [ax for ax in figure.figure.axes if ax.get_title()]
        assert len(panels) == 4 and [ax.get_xlabel() for ax in panels] == [words] * 4
        assert "." not in figure.caption.split(":")[1].split("(")[0]  # no config key in the caption's sentence
        plt.close(figure.figure)
    assert pf.words("dataset.train_limit") == "training images per category"
    assert pf.words("patchcore.scoring.some_new_key") == "some new key"


def test_categorical_sweeps_are_points_numeric_sweeps_lines(runs) -> None:
    def joined(key: str) -> list[bool]:
        [figure] = pf.sweep_figure(_comparison(runs, key))
        ax = figure.figure.axes[0]
        found = [str(line.get_linestyle()) not in ("None", "none", "") for line in ax.get_lines()
                 if len(line.get_xdata()) > 1]
        plt.close(figure.figure)
        return found

    assert joined("backbone_layers") and not any(joined("backbone_layers"))  # layer sets: no line between them
    assert any(joined("coreset_ratio"))


def test_diagnostics_drop_constant_series_and_name_axes_in_words() -> None:
    frames = {"a": pd.DataFrame({"step": [0, 1, 2], "loss": [3.0, 2.0, 1.0], "bank_size": [160] * 3,
                                 "nn_distance_cv": [0.1, 0.2, 0.3], "image_auroc_subtle": [None] * 3}),
              "b": pd.DataFrame({"step": [0, 1, 2], "loss": [2.0, 2.0, 2.0], "bank_size": [160] * 3,
                                 "nn_distance_cv": [0.1, 0.1, 0.2], "image_auroc_subtle": [None] * 3})}
    keys, constant = _quantities(frames)
    assert keys == ["loss", "nn_distance_cv"] and constant == {"proxy memory-bank size": "160"}
    fig = _step_panels(frames, keys)
    labels = [ax.get_ylabel().replace("\n", " ") for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["training loss", "NN distances: std / mean"]
    plt.close(fig)


def _finetuned_arm(root: Path, name: str) -> Arm:
    folder = root / name
    folder.mkdir(parents=True)
    for suffix, rows in (("loss", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]),
                         ("proxy", [{"step": 0, "score": 0.8, "bank_size": 10}, {"step": 2, "score": 0.9,
                                                                                   "bank_size": 10}])):
        (folder / f"a.{suffix}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    target = f"{FineTunedBackbone.__module__}.{FineTunedBackbone.__qualname__}"
    run = Run(Path(f"/runs/{name}"), {"config": {"seed": 0, "backbone": {"_target_": target, "checkpoint": str(
        folder / "${category}.pt")}}, "categories": {"a": {}}}, None)
    return Arm(name, pd.DataFrame([{"seed": 0, "category": "a", "image_auroc": 0.9}]), [run])


def test_the_appendix_holds_the_diagnostics_each_fine_tuning_once(tmp_path) -> None:
    baseline = Arm("baseline", pd.DataFrame([{"seed": 0, "category": "a", "image_auroc": 0.9}]),
                   [Run(Path("/runs/b"), {"config": {"seed": 0}, "categories": {"a": {}}}, None)])
    rotation = _finetuned_arm(tmp_path, "rotation")
    shared = [Comparison("finetuning", "Fine-tuned", [baseline, rotation], dataset="x"),
              Comparison("length", "Length", [baseline, rotation], dataset="x")]
    ctx = SimpleNamespace(present=shared, out=tmp_path / "out")
    blocks = diagnostics_blocks(ctx, figure_blocks)
    assert blocks[0].text == DIAGNOSTICS and blocks[0].level == 1
    figures = [b for b in blocks[2:]]
    assert [b.name for b in figures] == ["finetune_loss_finetuning_rotation", "finetune_proxy_finetuning_rotation"]
    assert "proxy memory-bank size 10" in figures[1].caption  # constant: named, not drawn
    assert all((ctx.out / b.path).is_file() for b in figures)
    # the appendix, after the reproducibility section, is where the paper puts them
    source = (Path(__file__).resolve().parents[1] / "reports" / "paper" / "appendix.md").read_text()
    assert source.index("{{appendix_blocks}}") < source.index("{{diagnostics_blocks}}")


def filled(png: bytes) -> float:
    """How far down a page's text area (the A4 page less the 2.2 cm top and bottom margins) its ink reaches."""
    import io

    from PIL import Image

    from experiments.reporting.typst_out import INK

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    margin = int(2.2 * grey.shape[0] / 29.7)
    rows = np.flatnonzero((grey[margin:-margin] < INK).any(axis=1))
    return (rows.max() + 1) / (grey.shape[0] - 2 * margin) if len(rows) else 0.0


def test_floating_figures_leave_no_half_empty_page(tmp_path) -> None:
    """A figure too tall for the rest of its page: inline, it leaves the page more than half empty; floating
    (the paper's figures), the text after it fills the page and the figure opens the next."""
    import typst
    from PIL import Image

    from experiments.reporting.document import Document, FigureBlock, text
    from experiments.reporting.typst_out import render_pages, write_pdf

    Image.new("RGB", (300, 330), "black").save(tmp_path / "tall.png")
    words = " ".join(["A sentence that fills the page with grey text until it is full."] * 30)
    blocks = [text(words), FigureBlock("tall", "tall.png", "A tall figure."), *[text(words)] * 5]
    fills = {}
    for floats in (False, True):
        out = tmp_path / str(floats)
        out.mkdir()
        (out / "tall.png").write_bytes((tmp_path / "tall.png").read_bytes())
        write_pdf(Document("t", "s", blocks, {}), out, floats=floats)
        fills[floats] = [filled(png) for png in render_pages(typst.Compiler(str(out / "report.typ"),
                                                                              root=str(out)), ppi=30)]
    assert fills[False][0] < 0.5  # the defect: the figure did not fit, the page ends early
    assert min(fills[True][:-1]) > 0.9
