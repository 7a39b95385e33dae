"""The paper (experiments/reporting/paper.py) from a small synthetic study with hand-written results.json:
every section in the PDF's text, every table cell traced back to its results.json and equal to the number
computed by hand, result sentences made from the numbers, missing comparisons reported as missing (never an
empty table), and the HTML checked in headless Chromium (images load, links resolve, tables sort)."""

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
from hydra import compose, initialize_config_dir

from experiments.reporting.intervals import Paired, bootstrap
from experiments.reporting.paper import SECTION_TITLES, build_paper
from experiments.reporting.stats import signed, verdict
from tests.conftest import CONF_DIR
from tests.test_report import write_run
from tests.test_report_figures import filled

BASE = {0: {"bottle": 0.90, "screw": 0.80}, 1: {"bottle": 0.92, "screw": 0.82}}
COSINE = {0: {"bottle": 0.95, "screw": 0.85}, 1: {"bottle": 0.93, "screw": 0.83}}   # +5, +5, +1, +1
CHANNEL = {0: {"bottle": 0.80, "screw": 0.70}, 1: {"bottle": 0.82, "screw": 0.72}}  # -10 everywhere


def _make_config(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["dataset=mvtec", "dataset.root=/data/mvtec", "backbone=effnet_lite0",
                                            *overrides])


def _study(root: Path, manifest: bool = True) -> Path:
    study = root / "syn"
    jobs = []

    def job(comparison: str, arm: str, seed: int, overrides: tuple, aurocs: dict | None, status: str = "done"):
        folder = study / comparison / f"{arm.replace(' ', '_')}_seed{seed}"
        if aurocs is not None:
            write_run(folder, _make_config, (*overrides, f"seed={seed}"), aurocs, maps=seed == 0, images=10)
        jobs.append({"id": f"{comparison}/{folder.name}", "kind": "patchcore", "comparison": comparison, "arm": arm,
                     "seed": seed, "folder": str(folder), "command": f"python experiments/main.py seed={seed}",
                     "status": status, "duration_s": 10.0})
        return jobs[-1]["id"]

    base = [job("baseline", "baseline", s, (), BASE[s]) for s in (0, 1)]
    variants = [job("variants", "cosine distance", s, ("patchcore.scoring.distance=cosine",), COSINE[s])
                for s in (0, 1)]
    variants += [job("variants", "channel_mean", s, ("patchcore.embedder.aggregation=channel_mean",), CHANNEL[s])
                 for s in (0, 1)]
    failed = job("baselines", "random bank", 0, ("coreset=random",), None, status="failed")
    if manifest:
        record = {"study": "syn", "command": "python experiments/study.py --study syn", "dataset": "mvtec",
                  "config": {"logger": "none", "comparisons": {}},
                  "machine": {"cpus": 2, "torch_threads": 2, "cuda": None, "python": "3.11", "torch": "2.x"},
                  "comparisons": {
                      "extractors": {"title": "Feature extractors", "arms": ["baseline"], "jobs": base},
                      "variants": {"title": "Variants of the algorithm",
                                   "arms": ["baseline", "cosine distance", "channel_mean"], "jobs": base + variants},
                      "baselines": {"title": "Memory-bank and model baselines", "arms": ["baseline", "random bank"],
                                    "jobs": [*base, failed]}},
                  "skipped": [{"comparison": "extractors", "arm": "clip",
                               "reason": "weights not available: WeightsNotFoundError: not cached"}],
                  "jobs": jobs}
        (study / "study.json").write_text(json.dumps(record))
    return study


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> tuple[Path, dict, str]:
    study = _study(tmp_path_factory.mktemp("studies"))
    out = tmp_path_factory.mktemp("paper")
    record = build_paper([study], out)
    from pypdf import PdfReader

    pages = [" ".join((page.extract_text() or "").split()) for page in PdfReader(out / "report.pdf").pages]
    # each page's number (its footer, extracted last) left out, so a sentence across a page break reads whole
    pdf_text = " ".join(re.sub(rf"\s*\b{n}$", "", page) for n, page in enumerate(pages, 1))
    return out, record, pdf_text


def test_every_section_is_in_the_pdf(paper) -> None:
    out, record, pdf = paper
    assert record["sections"] == list(SECTION_TITLES)
    for title in [*SECTION_TITLES, "References"]:
        assert title in pdf, title
    assert "PatchCore" in pdf and "Roth" in pdf  # a citation resolved into the bibliography
    for name in ("report.typ", "report.html", "tables/paper_main.tex", "tables/paper_variants_summary.csv",
                 "tables/sources.csv"):
        assert (out / name).is_file(), name


def _recompute(cell: dict, table: str) -> float:
    """The cell's number computed again from its results.json files alone."""
    records = [json.loads(Path(p).read_text()) for p in cell["sources"]]
    if table.endswith("_image_auroc") and cell["column"] != "mean":
        return 100 * sum(r["categories"][cell["column"]]["image_auroc"] for r in records) / len(records)
    metric = {"Image AUROC": "image_auroc", "Pixel AUROC": "pixel_auroc", "AUPRO": "aupro",
              "PRO": "aupro_defect_images",
              "Image F1-max": "image_f1_max", "mean": "image_auroc"}[cell["column"]]
    per_run = [sum(c[metric] for c in r["categories"].values()) / len(r["categories"]) for r in records]
    return 100 * sum(per_run) / len(per_run)


def test_every_table_cell_traces_back_to_a_results_json(paper) -> None:
    out, record, _ = paper
    cells = record["cells"]
    # every table holds traced numbers, but for those of words (arms not run and why, commits, fine-tuning settings,
    # the replication's trends) and of numbers from elsewhere (the official code's golden outputs); the published
    # numbers' table traces only this study's row
    assert {c["table"] for c in cells} == set(record["tables"]) - {"not_run", "commits", "finetune_settings",
                                                                  "replication_parity", "replication_trends"}
    assert {c["row"] for c in cells if c["table"] == "replication_numbers"} == {"this study"}
    assert "not_run" in record["tables"]
    checked = 0
    for cell in cells:
        assert cell["sources"] and all(Path(p).is_file() and p.endswith("results.json") for p in cell["sources"])
        if "_paired" in cell["table"] or cell["column"] in ("seeds", "fit s / category", "of which fine-tuning"):
            continue
        assert cell["value"] == pytest.approx(_recompute(cell, cell["table"]), abs=1e-9), cell
        checked += 1
    assert checked >= 20
    # hand-computed: the variants table, arm x (bottle, screw, mean)
    by_key = {(c["table"], c["row"], c["column"]): c for c in cells}
    assert by_key[("variants_image_auroc", "baseline", "bottle")]["text"] == "91.0 ± 1.4"
    assert by_key[("variants_image_auroc", "cosine distance", "mean")]["value"] == pytest.approx(89.0)
    assert by_key[("variants_image_auroc", "channel_mean", "screw")]["value"] == pytest.approx(71.0)
    # paired: cosine +5, +5 (seed 0), +1, +1 (seed 1) -> +3.0; image AUROC: the bootstrap over the scores.csv
    # images, read here on their own (intervals.bootstrap itself is checked in tests/test_intervals.py)
    cosine = by_key[("variants_paired", "cosine distance", "Δ Image AUROC")]
    low, high = _bootstrap_bounds(cosine["sources"], "cosine")
    assert cosine["value"] == pytest.approx(3.0) and cosine["text"] == f"+3.0 [{signed(low)}, {signed(high)}]"
    # pixel AUROC (no per-image scores): seed level, per-seed means +5, +1: t(0.975, 1) * 2.828 / sqrt(2) = 25.4
    assert by_key[("variants_paired", "cosine distance", "Δ Pixel AUROC")]["text"] == "+3.0 [-22.4, +28.4]"
    assert by_key[("variants_paired", "channel_mean", "Δ Pixel AUROC")]["text"] == "-10.0 [-10.0, -10.0]"
    channel = dict(zip(("low", "high"), _bootstrap_bounds(
        by_key[("variants_paired", "channel_mean", "Δ Image AUROC")]["sources"], "channel")))
    verdicts = {row: text for (table, row, column), text in _texts(out, "paper_variants_paired").items()
                if column == "verdict"}
    assert verdicts["channel_mean"] == verdict(channel)
    # the best of each column is bold in the LaTeX copy
    tex = (out / "tables" / "paper_variants_image_auroc.tex").read_text()
    assert r"\textbf{93.0 $\pm$ 2.8}" in tex or r"\textbf{94.0 $\pm$ 1.4}" in tex


def _texts(out: Path, table: str) -> dict[tuple[str, str, str], str]:
    """(table, row, column) -> the cell's text, from the table's Markdown copy."""
    lines = [line.strip("|").split("|") for line in (out / "tables" / f"{table}.md").read_text().splitlines()
             if line.startswith("|")]
    header = [h.strip() for h in lines[0]]
    return {(table, row[0].strip().strip("*"), column): cell.strip().strip("*") for row in lines[2:]
            for column, cell in zip(header[1:], row[1:])}


def _bootstrap_bounds(sources: list[str], arm: str) -> tuple[float, float]:
    """The image-AUROC bootstrap of ``arm`` against the baseline from the runs' scores.csv, paired by seed."""
    runs = {(("base" if "baseline" in p else "arm"), json.loads(Path(p).read_text())["config"]["seed"]): Path(p).parent
            for p in sources if "baseline" in p or arm in p}
    pairs = {}
    for category in ("bottle", "screw"):
        for seed in (0, 1):
            rows = [{r["path"]: r for r in csv.DictReader((runs[(side, seed)] / "scores.csv").open())
                     if r["category"] == category} for side in ("base", "arm")]
            paths = tuple(sorted(rows[0]))
            labels = np.array([int(rows[0][p]["label"]) for p in paths])
            base, tuned = (np.array([float(r[p]["image_score"]) for p in paths]) for r in rows)
            pairs.setdefault(category, []).append(Paired(paths, labels, base, tuned))
    result = bootstrap(pairs)
    return result["low"], result["high"]


def test_result_sentences_come_from_the_numbers(paper) -> None:
    out, record, pdf = paper
    cosine = next(c for c in record["cells"] if c["table"] == "variants_paired" and c["row"] == "cosine distance")
    low, high = _bootstrap_bounds(cosine["sources"], "cosine")
    # a resolved difference is said in full; an unresolved one only named (its numbers are in the table below)
    assert low <= 0 < high and "cosine distance changes mean Image AUROC" not in pdf  # +5, +1: the bound on 0
    assert ("Not resolved in image AUROC (the 95% interval holds 0 and reaches beyond ±0.5 points): cosine distance "
            "and channel_mean.") in pdf
    assert "cosine distance changes mean Pixel AUROC" not in pdf  # -22.4 to +28.4
    assert "Lower than the baseline (95% interval below 0), in Pixel AUROC: channel_mean -10.0 [-10.0, -10.0] " \
        "points." in pdf
    assert "Lower on at least one metric (95% interval below 0): channel_mean" in pdf
    # the table captions say how each interval was made
    caption = (out / "tables" / "paper_variants_paired.md").read_text().splitlines()[0]
    assert "Image AUROC: paired bootstrap over the test images" in caption
    assert "Pixel AUROC and AUPRO: seed level, test images held fixed" in caption


def test_no_page_runs_into_the_margins(paper, tmp_path) -> None:
    out, record, _ = paper
    assert record["pages_overflowing"] == []
    # the check itself: a code line without spaces, wider than the text column, is found on its page
    import typst

    from experiments.reporting.typst_out import (
        MARGIN_X_CM,
        PAGE_WIDTH_CM,
        PREAMBLE,
        pages_with_margin_ink,
        render_pages,
    )

    source = tmp_path / "wide.typ"
    source.write_text(PREAMBLE.format(title='"t"') + "fits\n#pagebreak()\n#raw(block: true, \"" + "x" * 200 + "\")\n")
    pages = render_pages(typst.Compiler(str(source), root=str(tmp_path)), ppi=40)
    assert pages_with_margin_ink(pages, MARGIN_X_CM, PAGE_WIDTH_CM) == [2]


def test_no_page_is_left_half_empty(paper) -> None:
    """Figures float (typst_out._figure): a figure that does not fit moves to the next page while the text fills
    this one. Only the page before the appendix's page break and the last page may end early."""
    import typst
    from pypdf import PdfReader

    from experiments.reporting.typst_out import render_pages

    out, _, _ = paper
    assert "placement: auto" in (out / "report.typ").read_text()
    pages = render_pages(typst.Compiler(str(out / "report.typ"), root=str(out)), ppi=30)
    texts = [page.extract_text() or "" for page in PdfReader(out / "report.pdf").pages]
    appendix = next(i for i, t in enumerate(texts) if re.match(r"\s*\d+\s+Reproducibility", t))
    short = [number for number, png in enumerate(pages[:-1], 1) if filled(png) < 0.5 and number != appendix]
    assert short == []


def test_commands_once_per_job_kind_with_the_manifest(paper) -> None:
    """Not every job's command line: the study's, one job of each kind (all 6 done jobs here are patchcore
    runs; the failed one too) with study.json, which lists them all, and the report's."""
    out, record, pdf = paper
    source = (out / "report.typ").read_text()
    commands = [line for line in source.replace("\\n", "\n").splitlines() if line.startswith("python experiments/")]
    assert [c.split()[1] for c in commands] == ["experiments/study.py", "experiments/main.py",
                                                "experiments/report.py"]
    assert "patchcore: 7 jobs" in pdf and "study.json" in pdf


def test_arm_names_with_brackets_make_valid_labels(tmp_path) -> None:
    """Arm names such as "rotation (l2sp=0)" reach table and figure labels; Typst refused them unsanitised."""
    import typst

    from experiments.reporting.document import TableBlock
    from experiments.reporting.typst_out import PREAMBLE, block, label

    assert label("tab", "finetuning_l2sp_rotation (l2sp=0)") == "<tab-finetuning_l2sp_rotation__l2sp_0_>"
    table = TableBlock("sel_rotation (l2sp=0)", "caption", ["arm", "x"], [])
    source = tmp_path / "t.typ"
    source.write_text(PREAMBLE.format(title='"t"') + block(table) + "\n")
    assert typst.compile(str(source), root=str(tmp_path), format="pdf")[:4] == b"%PDF"


def test_missing_comparisons_are_reported_never_empty(paper) -> None:
    out, record, pdf = paper
    # a one-line reason, never the error text (which stays in paper.json and study.json)
    assert "Not in these runs: feature extractors (clip: pretrained weights not on this machine)" in pdf
    assert "Not in these runs: memory-bank and model baselines (random bank: job failed (seed 0))" in pdf
    assert "WeightsNotFoundError" not in pdf
    assert not any(name.startswith(("extractors", "baselines")) for name in record["tables"])
    html = (out / "report.html").read_text()
    assert "Not in these runs: feature extractors" in html
    assert record["comparisons"]["extractors"]["missing"] == [
        ["clip", "weights not available: WeightsNotFoundError: not cached"]]


def test_runs_without_a_study_are_compared_by_their_settings(tmp_path) -> None:
    """No study manifest: one comparison per deviating setting, named and titled by the setting (no table of
    settings or titles in the code); the numbers are the study's."""
    study = _study(tmp_path / "runs", manifest=False)
    record = build_paper([study], tmp_path / "out")
    assert record["comparisons"] == {
        "patchcore_embedder_aggregation": {"title": "patchcore.embedder.aggregation", "missing": [],
                                  "arms": ["baseline", "effnet_lite0 (aggregation=channel_mean)"]},
        "patchcore_scoring_distance": {"title": "patchcore.scoring.distance", "missing": [],
                               "arms": ["baseline", "effnet_lite0 (distance=cosine)"]}}
    by_key = {(c["table"], c["row"], c["column"]): c for c in record["cells"]}
    cosine = by_key[("patchcore_scoring_distance_paired", "effnet_lite0 (distance=cosine)", "Δ Image AUROC")]
    low, high = _bootstrap_bounds(cosine["sources"], "cosine")
    assert cosine["text"] == f"+3.0 [{signed(low)}, {signed(high)}]"  # as in the study's variants comparison


CHECK = """<script>
window.addEventListener('load', function () {
  const images = Array.from(document.images)
    .map(i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0}));
  const anchors = Array.from(document.querySelectorAll('a[href^="#"]'))
    .map(a => ({href: a.getAttribute('href'), ok: !!document.getElementById(a.getAttribute('href').slice(1))}));
  const linked = Array.from(document.querySelectorAll('a[href]:not([href^="#"])')).map(a => a.getAttribute('href'));
  const table = document.getElementById('tab-variants_image_auroc');
  table.querySelectorAll('thead th')[1].click();
  const sorted = Array.from(table.tBodies[0].rows).map(r => r.cells[0].textContent);
  const pre = document.createElement('pre'); pre.id = 'check';
  pre.textContent = JSON.stringify({images, anchors, linked, sorted});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    """The browser; in CI (root, Debian) installed from the distribution's packages when missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None and os.environ.get("CI") and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        browser = shutil.which("chromium")
    return browser


def test_html_in_headless_chromium(paper) -> None:
    """Chromium from Debian (`apt-get install -y chromium`; .ci/run installs it): no broken image or link."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed and could not be installed: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out, _, _ = paper
    page = out / "check.html"
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                       .replace("&gt;", ">"))
    assert check["images"] and all(image["ok"] for image in check["images"]), \
        [i for i in check["images"] if not i["ok"]]
    assert any("gallery/" in image["src"] for image in check["images"])  # the map gallery
    assert check["anchors"] and all(anchor["ok"] for anchor in check["anchors"])
    assert all((out / href).is_file() for href in check["linked"])
    # sorted by the bottle column, ascending: channel_mean 81, baseline 91, cosine 94; the mean row stays last
    assert check["sorted"] == ["channel_mean", "baseline", "cosine distance"]


def test_a_paper_without_the_gallery_copies_no_maps(paper, tmp_path) -> None:
    """--no-gallery (reports/reference/ is built so): the HTML has no map gallery and nothing is copied for it;
    the figures stay."""
    out, _, _ = paper
    assert "Anomaly-map gallery" in (out / "report.html").read_text() and (out / "gallery").is_dir()
    small = tmp_path / "small"
    record = build_paper([_study(tmp_path / "studies")], small, gallery=False)
    html = (small / "report.html").read_text()
    assert "Anomaly-map gallery" not in html and "gallery/" not in html and not (small / "gallery").exists()
    assert record["figures"] and all((small / path).is_file() for path in record["figures"])
