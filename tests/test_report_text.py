"""The paper's generated text, tables and settings (experiments/reporting/paper_setup.py, wording.py): arms that
could not run get a one-line reason and never raw error text; no template plurals, possessives on arm names or
second spellings; numeric arm names sorted as numbers; every result sentence's verdict matches the interval it
prints; the setup states the settings behind the numbers (test split, fine-tuning, proxy, metrics); a fine-tuned
arm's fit time includes its fine-tuning; commits per comparison; the title, authors and affiliation settings."""

from __future__ import annotations

import csv
import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from experiments.reporting.front_matter import FrontMatter
from experiments.reporting.paper import build_paper
from experiments.reporting.paper_sections import difference_sentence
from experiments.reporting.stats import EQUIVALENCE, signed, verdict
from experiments.reporting.wording import lower_first, natural_key, noun, plural, pluralise_template, short_reason
from tests.test_report import write_run
from tests.test_report_paper import BASE, _make_config, _study

RAW = ("weights not available: WeightsNotFoundError: Pretrained weights for ViT-B-16 (openai) not found: looked for "
       "/root/.cache/huggingface/hub/models--timm/open_clip_pytorch_model.bin and downloading https://huggingface.co/"
       "timm/x failed (Traceback (most recent call last):\n  File \"/x/y.py\", line 3, in <module>)")
TUNED = "rotation (l2sp=0)"
TRAIN_S, EVAL_S = 30.0, 5.0  # each sidecar's fine-tuning: training and proxy-evaluation seconds


def _sidecar(path: Path, category: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    train = {"max_steps": 40, "batch_size": 8, "lr": 1e-4, "head_lr": 1e-3, "l2sp_weight": 0.0, "frozen_stages": 1}
    path.write_text(json.dumps({
        "complete": True, "method": "rotation", "category": category, "steps": 40, "selected_step": 20,
        "train_time_s": TRAIN_S, "config": {"method": {"name": "rotation", "train": train,
                                                       "objective": {"hidden_dim": 256}}},
        "selection": {"proxy": {"score": 0.9, "image_auroc": 0.9, "pixel_auroc": 0.9},
                      "start": {"score": 0.8, "image_auroc": 0.8, "pixel_auroc": 0.8, "effective_rank": 10.0},
                      "monitors": {"effective_rank": 9.0, "weight_distance_rel": 0.01}, "collapse_warnings": [],
                      "eval_time_s": EVAL_S,
                      "config": {"holdout": 0.2, "max_holdout": 30, "eval_every": 20, "patience": 2,
                                 "metric": "mean_auroc", "kinds": ["cutpaste", "cutmix", "draem", "perlin"]},
                      "anomalies": {"kinds": ["cutpaste", "cutmix", "draem", "perlin"],
                                    "textures": "procedural gratings and noise"}}}))


def _with_tuned_arm(root: Path) -> Path:
    """tests/test_report_paper.py's synthetic study plus a fine-tuned arm (sidecars, another git commit), an
    extractor skipped with a raw error text full of URLs and paths, and the paper's front matter in its YAML."""
    study = _study(root)
    record = json.loads((study / "study.json").read_text())
    ids = []
    for seed in (0, 1):
        folder = study / "finetuning" / f"tuned_seed{seed}"
        checkpoint = study / "checkpoints" / f"seed{seed}"
        write_run(folder, _make_config, ("backbone=finetuned", "backbone.method=rotation", "backbone.base=effnet_lite0",
                                         f"backbone.checkpoint={checkpoint}/${{category}}.pt", f"seed={seed}"),
                  {c: v + 0.01 for c, v in BASE[seed].items()}, images=10)
        results = json.loads((folder / "results.json").read_text())
        (folder / "results.json").write_text(json.dumps({**results, "git_commit": "def456"}))
        for category in BASE[seed]:
            _sidecar(checkpoint / f"{category}.json", category)
        ids.append(f"finetuning/{folder.name}")
        record["jobs"].append({"id": ids[-1], "kind": "patchcore", "comparison": "finetuning", "arm": TUNED,
                               "seed": seed, "folder": str(folder), "command": "python experiments/main.py",
                               "status": "done", "duration_s": 10.0})
    base = [job["id"] for job in record["jobs"] if job["arm"] == "baseline"]
    record["comparisons"]["finetuning"] = {"title": "Fine-tuning with a stronger L2-SP", "arms": ["baseline", TUNED],
                                           "jobs": base + ids}
    record["skipped"].append({"comparison": "extractors", "arm": "clip_b16", "reason": RAW})
    record["config"]["report"] = {"title": "Feature extractors for inspection", "authors": "A. Author",
                                  "affiliation": "Some Lab"}
    (study / "study.json").write_text(json.dumps(record))
    first = study / "baseline" / "baseline_seed0" / "results.json"
    definitions = {"image_auroc": "ROC AUC of the image scores", "aupro": "AU-PRO integrated to FPR 0.3 and divided "
                   "by 0.3"}
    first.write_text(json.dumps({**json.loads(first.read_text()), "metric_definitions": definitions}))
    return study


def _html_text(path: Path) -> str:
    page = re.sub(r"<script.*?</script>|<style.*?</style>", " ", path.read_text(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> tuple[Path, dict, str, str]:
    study = _with_tuned_arm(tmp_path_factory.mktemp("studies"))
    out = tmp_path_factory.mktemp("paper")
    record = build_paper([study], out)
    from pypdf import PdfReader

    pages = [" ".join((page.extract_text() or "").split()) for page in PdfReader(out / "report.pdf").pages]
    pdf = " ".join(re.sub(rf"\s*\b{n}$", "", page) for n, page in enumerate(pages, 1))
    return out, record, pdf, _html_text(out / "report.html")


def _rows(out: Path, table: str) -> list[dict]:
    with (out / "tables" / f"paper_{table}.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_arms_not_run_get_a_one_line_reason_never_the_error_text(paper) -> None:
    out, record, pdf, page = paper
    for shown in (pdf, page):
        for raw in ("http", "://", "Traceback", 'File "', ".cache", "WeightsNotFoundError"):
            assert raw not in shown, raw
    assert "feature extractors / clip_b16" in page.lower() or "Feature extractors / clip_b16" in page
    assert "clip_b16 pretrained weights not on this machine" in page  # the table row: arm, reason
    assert ["clip_b16", RAW] in record["comparisons"]["extractors"]["missing"]  # the full text kept
    assert short_reason(RAW) == "pretrained weights not on this machine"
    assert short_reason("seed 0: failed; seed 1: failed") == "job failed (seeds 0 and 1)"
    # a weights message names the cache's .../hub/checkpoints/ folder: still the pretrained weights
    assert short_reason("weights not available: WeightsNotFoundError: Pretrained weights for resnet18 not found: "
                        "looked for /root/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth") == \
        "pretrained weights not on this machine"
    assert short_reason("MissingCheckpointError: no rotation checkpoint for category 'mono'") == \
        "fine-tuned checkpoint missing on this machine"
    assert short_reason("a fine-tuned checkpoint outside the study").startswith("a fine-tuned checkpoint from outside")
    assert short_reason("seed 2: not run yet") == "not run yet (seed 2)"
    assert short_reason("weights not available: FileNotFoundError: fine-tuned checkpoint /x.pt missing") == \
        "fine-tuned checkpoint missing on this machine"
    assert short_reason("something odd happened at http://x") == "could not run (the reason is in study.json)"


def test_no_template_plurals_possessives_on_arm_names_or_second_spellings(paper) -> None:
    out, record, pdf, page = paper
    for shown in (pdf, page):
        assert "(s)" not in shown
        assert "l2-sp" not in shown and "L2-SP" in shown
        assert not re.search(r"(cosine distance|channel_mean|l2sp=0\))'s", shown)  # no possessive on an arm name
    assert "same seed, 2 seeds" in page
    assert "Not in these runs: fine-tuning" not in page  # the L2-SP comparison ran; its title kept its acronym
    assert "Not in these runs: feature extractors (clip: pretrained weights not on this machine; clip_b16: " in page
    assert [noun(1, "seed"), noun(3, "seed"), noun(2, "category"), noun(0, "comparison")] == \
        ["seed", "seeds", "categories", "comparisons"]
    assert plural(1, "git commit") == "1 git commit" and plural(8, "git commit") == "8 git commits"
    assert pluralise_template("with {{n}} seed(s) and {{m}} run(s)", {"n": "1", "m": "3"}) == \
        "with {{n}} seed and {{m}} runs"
    assert lower_first("Fine-tuning with a stronger L2-SP") == "fine-tuning with a stronger L2-SP"
    assert lower_first("CAE baselines") == "CAE baselines" and lower_first("L2-SP weight") == "L2-SP weight"


def test_numeric_arm_names_sort_as_numbers() -> None:
    names = ["train_limit=16", "train_limit=2", "baseline", "train_limit=1", "ratio=0.01", "ratio=0.1"]
    assert sorted(names, key=natural_key) == ["baseline", "ratio=0.01", "ratio=0.1", "train_limit=1",
                                              "train_limit=2", "train_limit=16"]
    assert sorted(["rotation 200 steps", "rotation 40 steps"], key=natural_key) == ["rotation 40 steps",
                                                                                    "rotation 200 steps"]


SENTENCE = re.compile(r"changes mean (Image AUROC|Pixel AUROC|AUPRO) by (\S+) points \((?:95% interval (\S+) to (\S+)"
                      r"|no interval);.*?\): (higher than the baseline|lower than the baseline|equivalent to the "
                      r"baseline|not resolved)")


def _check(low: str | None, high: str | None, said: str) -> None:
    """The verdict a sentence prints, against the interval it prints (stats.verdict's rule on the printed bounds)."""
    if low is None:
        assert said == "not resolved"
        return
    lo, hi = float(low), float(high)
    if said.startswith("higher"):
        assert lo > 0, (low, high, said)
    elif said.startswith("lower"):
        assert hi < 0, (low, high, said)
    elif said.startswith("equivalent"):
        assert -EQUIVALENCE <= lo <= hi <= EQUIVALENCE, (low, high, said)
    else:
        assert lo <= 0 <= hi and (lo < -EQUIVALENCE or hi > EQUIVALENCE), (low, high, said)


def test_every_result_sentence_matches_the_interval_it_prints(paper) -> None:
    out, record, pdf, page = paper
    for _, _, low, high, said in SENTENCE.findall(page):  # an arm's difference in full (method, selection)
        _check(low or None, high or None, said)
    # the results' resolved differences, grouped by direction and metric: "arm mean [low, high]"
    grouped = re.findall(r"(Higher|Lower) than the baseline \(95% interval (above|below) 0\), (.+?) points\.", page)
    assert grouped  # channel_mean's pixel AUROC, -10 on every seed
    for word, side, body in grouped:
        assert (word, side) in (("Higher", "above"), ("Lower", "below"))
        bounds = re.findall(r"\[(\S+), (\S+)\]", body)
        assert bounds and all(re.match(r"in (Image AUROC|Pixel AUROC): ", part) for part in body.split("; "))
        for low, high in bounds:
            _check(low, high, word.lower())
    # the unresolved ones only named: each such image-AUROC interval holds 0 and reaches beyond ±0.5
    listed = re.findall(r"Not resolved in image AUROC \(the 95% interval holds 0 and reaches beyond ±0\.5 points\): "
                        r"([^.]+)\.", page)
    verdicts = {}  # arm -> the verdict column of every paired table (Markdown copies)
    for table in (out / "tables").glob("paper_*_paired.md"):
        for line in table.read_text().splitlines()[4:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            verdicts.setdefault(cells[0], set()).add(cells[-2])
    assert listed
    for names in listed:
        for name in re.split(r", | and ", names):
            assert verdicts[name.strip()] == {"not resolved"}, name
    # the conclusion's lists: "name (mean [low, high])" under the word they support
    conclusion = page[page.index("Over "):page.index("References")]
    for heading, side in (("higher mean image AUROC (95% interval above 0):", 1),
                          ("Lower (95% interval below 0):", -1)):
        listed = conclusion.split(heading)[1].split(". ")[0] if heading in conclusion else ""
        for low, high in re.findall(r"\[(\S+), (\S+)\]", listed):
            assert (float(low) > 0) if side > 0 else (float(high) < 0), (low, high)
    assert conclusion.startswith("Over 2 comparisons on mvtec")
    # every way a bound can sit near an edge: printed bounds keep their side of 0 and of ±0.5, the word follows
    rng = np.random.default_rng(0)
    edges = [0.0, 1e-12, -1e-12, 0.004, -0.004, 0.04, -0.049, 0.5, -0.5, 0.5 + 1e-12, 0.4999, -0.5004, 0.5004]
    bounds = [*edges, *rng.uniform(-3, 3, 300)]
    for _ in range(2000):
        low, high = sorted(rng.choice(bounds, 2))
        diff = {"mean": (low + high) / 2, "low": low, "high": high, "n": 2, "seed_sd": 1.0, "pairing": "test"}
        sentence = difference_sentence("arm", "image_auroc", diff)
        (_, _, low_text, high_text, said), = SENTENCE.findall(sentence)
        _check(low_text, high_text, said)
        for value, text in ((low, low_text), (high, high_text)):
            assert float(text) == 0 or math.copysign(1, float(text)) == math.copysign(1, value), (value, text)
            assert (abs(value) <= 1e-9) == (float(text) == 0), (value, text)
        assert said.split(" ")[0] in verdict(diff)
    assert signed(0.004) == "+0.004" and signed(-0.5004) == "-0.5004" and signed(-0.49) == "-0.49"


def test_setup_states_every_setting_behind_the_numbers(paper) -> None:
    out, record, pdf, page = paper
    setup = page[page.index("Experimental setup"):page.index("Results")]
    assert "bottle: 10 nominal training images, 20 test images (10 nominal, 10 defective)" in setup
    settings = {row["arm"]: row for row in _rows(out, "finetune_settings")}
    assert set(settings) == {TUNED}
    header = "arm method max steps steps run batch lr head lr L2-SP λ frozen stages temperature"
    assert header in setup and f"{TUNED} rotation 40 40 8 0.0001 0.001 0 1 -" in setup
    assert "a seeded 20% of each category's nominal training images (at most 30) is held out" in setup
    assert "one of each family: cutpaste, cutmix, draem and perlin" in setup
    assert "the proxy score is the mean of the proxy's image AUROC and pixel AUROC" in setup
    assert "Every 20 steps" in setup and "after 2 evaluations without gain" in setup
    assert "AU-PRO [" in setup and "integrated to FPR 0.3 and divided by 0.3" in setup  # cited, from results.json
    method = page[page.index("Method"):page.index("Experimental setup")]
    assert "(here λ = 0)" in method and "(no contrastive arm in these runs)" in method


def test_fit_time_includes_the_fine_tuning(paper) -> None:
    out, *_ = paper
    rows = {row["arm"]: row for row in _rows(out, "finetuning_summary")}
    # write_run: extraction 2 + k s and coreset 1 s for category k (bottle, screw) -> 3.5 s; plus 30 + 5 s tuning
    assert float(rows["baseline"]["fit s / category"]) == pytest.approx(3.5)
    assert float(rows["baseline"]["of which fine-tuning"]) == 0
    assert float(rows[TUNED]["fit s / category"]) == pytest.approx(3.5 + TRAIN_S + EVAL_S)
    assert float(rows[TUNED]["of which fine-tuning"]) == pytest.approx(TRAIN_S + EVAL_S)
    # the collapse warnings: the same 0 in the CSV as in the PDF (no blank cell)
    selection = _rows(out, "finetuning_selection")
    assert selection and all(row["collapse warnings"] == "0.0" for row in selection)


def test_commits_per_comparison(paper) -> None:
    out, record, pdf, page = paper
    commits = {row["comparison / arm"]: row for row in _rows(out, "commits")}
    assert set(commits) == {"Fine-tuning with a stronger L2-SP / baseline", f"Fine-tuning with a stronger L2-SP / "
                                                                             f"{TUNED}"}
    assert "def456" in page and "2 git commits" in page


def test_title_authors_and_affiliation(paper, tmp_path) -> None:
    out, record, pdf, page = paper
    assert record["title"] == "[PARTIAL: 8 of 9 jobs finished] Feature extractors for inspection"
    assert "A. Author, Some Lab. Generated" in pdf
    given = FrontMatter.of({"config": {"report": {"title": "From YAML"}}}, title="Given", authors=None)
    assert (given.title, given.authors, given.affiliation) == ("Given", FrontMatter.authors, "")
    with pytest.raises(ValueError, match=r"study.yaml: report.authors=\['x'\] must be text"):
        FrontMatter.of({"source": "study.yaml", "config": {"report": {"authors": ["x"]}}})
    with pytest.raises(ValueError, match="report.titel is not a setting"):
        FrontMatter.of({"config": {"report": {"titel": "x"}}})
    # the default title says what the runs compare: fine-tuning and settings here, no cold start without selection
    plain = build_paper([_with_tuned_arm(tmp_path / "s")], tmp_path / "out", front=FrontMatter())
    assert plain["title"].endswith("A comparative study of PatchCore fine-tuning and settings on MVTec AD")
    assert "cold start" not in plain["title"]


def test_punctuation_after_a_citation_survives_and_words_align_left(paper) -> None:
    """Typst ends an embedded expression (a citation, code) at a ";" and drops it: the text escapes it. Table
    columns of words align left, of numbers right (document.TableBlock.numeric_columns), in both documents."""
    from experiments.reporting.document import Span
    from experiments.reporting.typst_out import spans

    assert spans([Span("text", "as in "), Span("cite", "wrn"), Span("text", "; then")]) == \
        r"as in #cite(<wrn>)\; then"
    out, _, _, html_text = paper
    source = (out / "report.typ").read_text()
    trends = source.split("Ablation trends", 1)[1]
    assert "align: (left, left, left, left, left)" in trends.split("#figure", 2)[1]
    numbers = source.split("Published numbers", 1)[1].split("#figure", 2)[1]
    assert "align: (left, left, left, right, right, right)" in numbers
    page = (out / "report.html").read_text()
    assert '<th class="w">published</th>' in page and '<th>Image AUROC</th>' in page


def test_dollar_signs_in_arm_names_are_text_and_maths_stays_maths() -> None:
    """An arm's overrides may hold an interpolation (backbone.checkpoint=.../${category}.pt): "${" opens no maths
    (Typst failed on such a paper with "expected expression"), while $k = 1$ stays maths; the text is escaped."""
    from experiments.reporting.document import Span, inline
    from experiments.reporting.typst_out import spans

    names = "a/${category}.pt; b/${category}.pt"
    assert inline(names) == [Span("text", names)]
    assert "$" not in spans(inline(names)).replace("\\$", "")
    assert inline("with $k = 1$ here") == [Span("text", "with "), Span("math", "k = 1"), Span("text", " here")]
    assert inline("costs $ 5 and $ 6") == [Span("text", "costs $ 5 and $ 6")]
