"""experiments/report.py (experiments.reporting) on hand-written run records: numbers in the right cells,
bold on the best, the runs left out listed, valid figures and a PDF with the expected pages."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.harness.anomaly_maps import save_record
from experiments.harness.results import config_record
from experiments.harness.run_key import config_hash
from experiments.report import main
from experiments.reporting.digest import build_digest as build_report
from experiments.reporting.typst_out import escape
from tests.conftest import write_tiny_category

CATEGORIES = ("bottle", "screw")
WRN = "wrn50"


def _metrics(auroc: float) -> dict:
    return {"image_auroc": auroc, "image_f1_max": auroc - 0.05, "pixel_auroc": auroc - 0.01,
            "pixel_f1_max": 0.5, "aupro": auroc - 0.1}


def write_run(folder: Path, make_config, overrides: tuple[str, ...], aurocs: dict[str, float],
              complete: bool = True, maps: bool = False, bank: int = 100, images: int | None = None) -> Path:
    """A run folder as experiments/main.py writes it, with chosen image AUROCs per category. ``images``: its
    scores.csv holds that many nominal and defective images whose scores give exactly those AUROCs (multiples of
    1 / images^2), so the report can bootstrap them; else 3 + 3 whose AUROC is not results.json's (the report then
    falls back to seed-level intervals)."""
    config = config_record(make_config(*overrides))  # as experiments/main.py records it (results.json schema 3)
    categories = {}
    rows = []
    n_train = config["dataset"]["train_limit"] or 10
    for k, (category, auroc) in enumerate(aurocs.items()):
        categories[category] = {**_metrics(auroc), "n_train": n_train, "n_test": 2 * (images or 3),
                                "bank_size": bank, "pixel_metrics_note": None,
                                "timings_s": {"extract": 2.0 + k, "coreset": 1.0, "predict": 3.0}}
        labels = [0, 0, 0, 1, 1, 1]
        scores = [0.1, 0.4, 0.35, 0.8, 0.3 + auroc / 10, 0.9]
        if images:
            # nominal i scores i / n; defect j beats all of them, r of them or none, adding up to auroc * n^2 wins
            beats_all, rest = divmod(round(auroc * images * images), images)
            labels = [0] * images + [1] * images
            scores = [i / images for i in range(images)] + [1.0 if j < beats_all else (rest - 0.5) / images
                                                            if j == beats_all and rest else -1.0
                                                            for j in range(images)]
        rows += [{"category": category, "path": f"/data/{category}/test/{i}.png",
                  "defect_type": "good" if label == 0 else "crack", "label": label, "image_score": score}
                 for i, (label, score) in enumerate(zip(labels, scores))]
        if maps:
            rng = np.random.default_rng(k)
            for i in (3, 0):
                save_record(folder / "maps" / category / f"{i:02d}_x_{i}", {
                    "image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                    "map": rng.random((32, 32)).astype(np.float16), "mask": np.eye(32, dtype=np.uint8),
                    "has_mask": True, "label": int(i == 3), "score": 0.5, "path": f"/data/{category}/test/{i}.png",
                    "defect_type": "crack" if i == 3 else "good", "vmin": 0.0, "vmax": 1.0})
    mean = {m: float(np.mean([c[m] for c in categories.values()])) for m in _metrics(0.0)}
    results = {"config": config, "categories": categories, "mean": mean, "failed": {} if complete else {"x": "boom"},
               "complete": complete, "peak_rss_mb": 1000.0 + bank, "total_time_s": 20.0,
               "versions": {"python": "3.11", "torch": "2.x"}, "git_commit": "abc123",
               "config_hash": config_hash(config)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / ".hydra").mkdir(exist_ok=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with (folder / "scores.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["category", "path", "defect_type", "label", "image_score"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    def make_config(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=["dataset=mvtec", "dataset.root=/data/mvtec", *overrides])

    runs = tmp_path_factory.mktemp("runs")
    both = dict.fromkeys(CATEGORIES)
    # backbone comparison: wrn50 with two seeds, resnet18 with one
    write_run(runs / "cmp" / "0", make_config, (f"backbone={WRN}", "seed=0"), {"bottle": 0.99, "screw": 0.90},
              maps=True)
    write_run(runs / "cmp" / "1", make_config, (f"backbone={WRN}", "seed=1"), {"bottle": 0.97, "screw": 0.92})
    write_run(runs / "cmp" / "2", make_config, ("backbone=resnet18",), {"bottle": 0.95, "screw": 0.93}, maps=True,
              bank=50)
    for i, ratio in enumerate((0.01, 0.25)):  # coreset sweep around the default 0.1
        write_run(runs / "coreset" / str(i), make_config, (f"backbone={WRN}", f"coreset.ratio={ratio}"),
                  {c: 0.9 + 0.01 * i for c in both})
    for i, layers in enumerate(("[layer2]", "[layer3]")):  # layer sweep
        write_run(runs / "layers" / str(i), make_config, (f"backbone={WRN}", f"backbone.layers={layers}"),
                  {c: 0.8 + 0.05 * i for c in both})
    for i, (limit, seed) in enumerate(((1, 0), (1, 1), (4, 0), (4, 1))):  # cold start
        write_run(runs / "cold" / str(i), make_config, (f"backbone={WRN}", f"dataset.train_limit={limit}",
                                                         f"seed={seed}"), {c: 0.6 + 0.1 * i for c in both})
    # left out: an unfinished run, a run on another dataset, an unreadable record
    write_run(runs / "odd" / "incomplete", make_config, ("backbone=resnet50",), {"bottle": 0.5}, complete=False)
    write_run(runs / "odd" / "btad", make_config, ("backbone=resnet50", "dataset=btad"), {"01": 0.7})
    # the same experiment run earlier with a setting that changes no number (batch_size): an older repeat
    repeat = write_run(runs / "odd" / "repeat", make_config, ("backbone=resnet18", "batch_size=16"),
                       {"bottle": 0.5, "screw": 0.5})
    os.utime(repeat / "results.json", (1_000_000_000, 1_000_000_000))
    (runs / "odd" / "broken").mkdir(parents=True)
    (runs / "odd" / "broken" / "results.json").write_text("{not json")
    out = tmp_path_factory.mktemp("reports")
    main([str(runs), "--out", str(out)])
    return out, json.loads((out / "digest.json").read_text())


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["category"]: row for row in csv.DictReader(handle)}


def test_metric_tables_hold_the_right_numbers(report) -> None:
    out, manifest = report
    assert manifest["dataset"] == "mvtec" and len(manifest["runs"]) == 11
    table = _csv(out / "tables" / "image_auroc.csv")
    assert float(table["bottle"][WRN]) == pytest.approx(98.0)  # mean of the two seeds
    assert float(table["screw"][WRN]) == pytest.approx(91.0)
    assert float(table["bottle"]["resnet18"]) == pytest.approx(95.0)
    assert float(table["mean"]["resnet18"]) == pytest.approx(94.0)
    assert float(table["mean"][WRN]) == pytest.approx(94.5)
    assert float(table["bottle"]["wrn50 (ratio=0.01)"]) == pytest.approx(90.0)
    assert float(table["screw"]["wrn50 (layers=layer3)"]) == pytest.approx(85.0)
    assert float(table["bottle"]["wrn50 (train_limit=4)"]) == pytest.approx(85.0)  # seeds: 0.8, 0.9
    std = _csv(out / "tables" / "image_auroc_std.csv")
    assert float(std["bottle"][WRN]) == pytest.approx(np.std([99, 97], ddof=1))
    assert std["bottle"]["resnet18"] == ""  # one seed: no spread
    aupro = _csv(out / "tables" / "aupro.csv")
    assert float(aupro["bottle"]["resnet18"]) == pytest.approx(85.0)
    timing = _csv_by(out / "tables" / "timing.csv", "variant")
    assert float(timing["resnet18"]["bank size"]) == 50 and float(timing["resnet18"]["fit s / category"]) == 3.5
    assert float(timing[WRN]["test images / s"]) == pytest.approx(2.0)


def _csv_by(path: Path, key: str) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row[key]: row for row in csv.DictReader(handle)}


def test_bold_marks_the_best_per_row(report) -> None:
    out, _ = report
    lines = (out / "tables" / "image_auroc.md").read_text().splitlines()

    def row(name: str) -> list[str]:
        line = next(line for line in lines if line.startswith(f"| {name} "))
        return [cell.strip() for cell in line.strip("|").split("|")]

    cells = dict(zip(row("category"), row("bottle")))
    assert cells[WRN] == "**98.0 ± 1.4**"
    assert cells["resnet18"] == "95.0" and not any(c.startswith("**") for k, c in cells.items() if k != WRN)
    screw = dict(zip(row("category"), row("screw")))
    assert screw["resnet18"] == "**93.0**"
    latex = (out / "tables" / "image_auroc.tex").read_text()
    assert r"\toprule" in latex and r"\bottomrule" in latex and r"\textbf{98.0 $\pm$ 1.4}" in latex
    assert r"\textbf{93.0}" in latex and "wrn50 (train\\_limit=4)" in latex


def test_left_out_runs_are_listed_not_mixed_in(report) -> None:
    out, manifest = report
    with (out / "tables" / "excluded.csv").open() as handle:
        reasons = {Path(row["run_dir"]).name: row["reason"] for row in csv.DictReader(handle)}
    assert "incomplete" in reasons["incomplete"] and "dataset btad" in reasons["btad"]
    assert "unreadable" in reasons["broken"]
    assert "repeat of" in reasons["repeat"] and reasons["repeat"].endswith("(same variant, seed and category, older)")
    runs = (out / "tables" / "runs.csv").read_text()
    assert "resnet50" not in runs and "btad" not in runs
    text = (out / "digest.md").read_text()
    assert "Runs not in this report" in text and "dataset btad (this report is on mvtec)" in text


def test_figures_are_valid_images(report) -> None:
    out, manifest = report
    # one sweep figure per inferred sweep comparison (the paper's), the ROC curves and the map grids of the variants
    expected = {"sweep_coreset_ratio", "sweep_backbone_layers", "sweep_dataset_train_limit", "roc", "maps_bottle",
                "maps_screw"}
    assert expected <= set(manifest["figures"])
    for name in expected:
        with Image.open(out / "figures" / f"{name}.png") as image:
            image.verify()
        with Image.open(out / "figures" / f"{name}.png") as image:
            assert image.size[0] > 500 and image.size[1] > 200
        assert (out / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")


def test_pdf_has_the_expected_pages(report) -> None:
    out, manifest = report
    data = (out / "digest.pdf").read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    pages = len(re.findall(rb"/Type\s*/Page\b", data))
    # typeset by Typst from digest.typ: title and setup fill page 1, the shared settings and the 5 tables page 2,
    # each comparison's differences to its baseline (4 tables) page 3 with the first two figures; the other 4
    # figures (the map grids sized to their columns, not the text width) pages 4-5, then the commands and the runs
    # left out on page 5
    assert pages == manifest["pages"] == 5
    assert manifest["pages_overflowing"] == []  # nothing runs into the side margins (typst_out.pages_with_margin_ink)
    if shutil.which("pdfinfo"):
        info = subprocess.run(["pdfinfo", str(out / "digest.pdf")], capture_output=True, text=True).stdout
        assert re.search(r"Pages:\s+5\b", info)
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(out / "digest.pdf"), "-"], capture_output=True, text=True).stdout
        assert "Image AUROC" in text and "python experiments/main.py" in text


def _markdown_table(markdown: str, caption: str) -> list[list[str]]:
    """The cells of the pipe table under ``caption`` (bold marks removed; the alignment row skipped)."""
    lines = markdown.split(f"**{caption}", 1)[1].split("\n\n", 2)[1].splitlines()
    return [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]


def _typst_table(source: str, caption: str) -> list[list[str]]:
    """The cells of the Typst table under ``caption`` (#strong and escapes removed)."""
    part = source.split(escape(caption), 1)[1].split("#figure", 1)[0]
    rows = [re.findall(r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]", line) for line in part.splitlines()
            if line.strip().startswith("[")]
    return [[re.sub(r"^#strong\[(.*)\]$", r"\1", c).replace("\\", "") for c in row] for row in rows]


def test_markdown_and_typst_render_the_same_document(report) -> None:
    """digest.md and digest.typ are two renders of one document model: the same table cells, the same text."""
    out, _ = report
    markdown, source = (out / "digest.md").read_text(), (out / "digest.typ").read_text()
    # the wrn50 bottle cell (seeds 99 and 97: mean 98.0, sample std 1.4), bold as the best of its row
    assert "| bottle | **98.0 ± 1.4** |" in markdown and "[bottle], [#strong[98.0 ± 1.4]]" in source
    caption = "Image AUROC in % per category and variant"
    table = _markdown_table(markdown, caption)
    assert table[0][:2] == ["category", WRN] and table[1][:2] == ["bottle", "98.0 ± 1.4"] and len(table) == 4
    assert table[3][0] == "mean" and table[3][1] == "94.5 ± 0.0"  # seed means (99+90)/2 = (97+92)/2 = 94.5
    assert _typst_table(source, caption) == table
    timing = "Time and memory"
    assert _typst_table(source, timing) == _markdown_table(markdown, timing)
    for heading in ("Setup", "Results", "Figures", "Reproducing these numbers", "Runs not in this report"):
        assert f"## {heading}" in markdown and f"= {heading}" in source


def test_random_weights_are_always_labelled(tmp_path, make_config) -> None:
    write_run(tmp_path / "runs" / "a", make_config, ("dataset=mvtec", "backbone=resnet18", "backbone.pretrained=false"),
              {"bottle": 0.9})
    manifest = build_report([tmp_path / "runs"], tmp_path / "out")
    table = _csv(tmp_path / "out" / "tables" / "image_auroc.csv")
    assert list(table["bottle"])[1:] == ["resnet18 (random weights)"] and manifest["pages"] >= 1
    assert "must not be read as results" in (tmp_path / "out" / "digest.md").read_text()


def test_map_grid_re_runs_a_saved_model(tmp_path, make_config) -> None:
    from experiments.harness.fit_and_evaluate import run

    write_tiny_category(tmp_path / "data", "widget")
    cfg = make_config("dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.resize=64",
                      "dataset.image_size=64", "backbone=resnet18", "backbone.pretrained=false",
                      "patchcore.embedder.embed_dim=64", "category=widget", "save_model=true", "viz.n=0", "logger=none")
    run(cfg, tmp_path / "runs" / "r")
    assert not (tmp_path / "runs" / "r" / "maps").exists()
    manifest = build_report([tmp_path / "runs"], tmp_path / "out")
    assert "maps_widget" in manifest["figures"]
    with Image.open(tmp_path / "out" / "figures" / "maps_widget.png") as image:
        image.verify()


def test_no_runs_still_writes_a_report(tmp_path) -> None:
    manifest = build_report([tmp_path / "nothing"], tmp_path / "out")
    assert manifest["runs"] == [] and manifest["pages"] == 1 and (tmp_path / "out" / "digest.pdf").is_file()
