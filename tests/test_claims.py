"""Written prose checked by the build (experiments/reporting/claims.py): numbers filled from the runs, claims
evaluated; a claim a changed result no longer supports fails the build with the claim, its numbers and the
file:line, or is marked with --mark-failed-claims."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from experiments.reporting.claims import ClaimError, Quantities, check, printed, resolve
from experiments.reporting.comparisons import load
from experiments.reporting.paper import build_paper
from tests.test_report import write_run
from tests.test_report_paper import BASE, CHANNEL, _make_config, _study

# cosine distance: +5 points on both categories in seed 0, +1 in seed 1 (tests/test_report_paper.py); channel_mean
# -10 everywhere
DISCUSSION = """# Discussion

The cosine distance scores higher than the Euclidean one, by {{= diff(mvtec/variants | cosine distance |
image_auroc)}} points. [[claim: diff(mvtec/variants | cosine distance | image_auroc) > 1]]
The channel mean loses {{= diff(mvtec/variants | channel_mean | image_auroc | screw)}} points on screw.
[[claim: diff(mvtec/variants | channel_mean | image_auroc | screw) < -5]]

{{discussion_blocks}}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return _study(tmp_path_factory.mktemp("studies"))


def _written(root: Path, text: str = DISCUSSION) -> Path:
    (root / "syn").mkdir(parents=True, exist_ok=True)
    (root / "syn" / "discussion.md").write_text(text)
    return root


def test_quantities_are_the_tables_numbers(study) -> None:
    quantities = Quantities(load([study]).present)
    assert quantities.value("diff(mvtec/variants | channel_mean | image_auroc | screw)") == pytest.approx(-10.0)
    assert quantities.value("mean(mvtec/variants | baseline | image_auroc | bottle)") == pytest.approx(91.0)
    assert quantities.value("seeds(mvtec/variants | cosine distance)") == 2
    assert printed(-10.0, "diff(x)") == "-10.0" and printed(0.004, "diff(x)") == "+0.004"


@pytest.mark.parametrize("condition, holds", [
    ("diff(mvtec/variants | channel_mean | image_auroc | screw) < -5", True),
    ("diff(mvtec/variants | channel_mean | image_auroc | screw) within 0.5", False),
    ("mean(mvtec/variants | baseline | image_auroc | bottle) >= 91", True),
    ("seeds(mvtec/variants | channel_mean) is 2", True),
    ("seeds(mvtec/variants | channel_mean) is not 2", False),
    # "is not resolved" names the verdict (it held for any other verdict when read as "is not" + "resolved")
    ("verdict(mvtec/variants | channel_mean | pixel_auroc) is not resolved", False),  # -10 on every seed
    ("verdict(mvtec/variants | channel_mean | pixel_auroc) is lower", True),
    ("verdict(mvtec/variants | channel_mean | pixel_auroc) is not higher", True),
    ("verdict(mvtec/variants | channel_mean | pixel_auroc) is not lower", False),
    ("verdict(mvtec/variants | channel_mean | image_auroc | screw) is not resolved", True),  # -10 [-30, 0]
])
def test_claims_are_conditions_on_the_results(study, condition, holds) -> None:
    assert check(condition, Quantities(load([study]).present), "x.md:1").holds is holds


@pytest.mark.parametrize("condition, why", [
    ("diff(mvtec/nonesuch | x | image_auroc) > 0", "no comparison 'mvtec/nonesuch'"),
    ("diff(mvtec/variants | nobody | image_auroc) > 0", "no arm 'nobody'"),
    ("__import__('os') > 0", "is not a quantity"),
    ("diff(mvtec/variants | cosine distance | image_auroc) maybe 1", "not a claim"),
    ("open(x) > 0", "is not a quantity"),
])
def test_a_claim_that_cannot_be_evaluated_does_not_hold_and_runs_no_code(study, condition, why) -> None:
    claim = check(condition, Quantities(load([study]).present), "x.md:1")
    assert not claim.holds and why in claim.why


def test_resolve_fills_numbers_and_removes_the_claim_markers(study) -> None:
    text, claims = resolve(DISCUSSION, "discussion.md", Quantities(load([study]).present), mark=False)
    assert "[[claim" not in text and "{{=" not in text and "-10.0 points on screw" in text
    assert [(c.source, c.holds) for c in claims] == [("discussion.md:4", True), ("discussion.md:6", True)]


def test_a_claim_may_end_in_a_bracket(study) -> None:
    """A value such as a list of layers ends in "]": the marker closes at the last bracket of "]]]"."""
    text, claims = resolve("Layers. [[claim: verdict(mvtec/variants | cosine distance | image_auroc) is [x]]] End.",
                           "d.md", Quantities(load([study]).present), mark=False)
    assert text == "Layers. End." and [c.condition for c in claims] == \
        ["verdict(mvtec/variants | cosine distance | image_auroc) is [x]"]


def test_the_build_passes_its_claims_and_lists_them(study, tmp_path) -> None:
    record = build_paper([study], tmp_path / "paper", written=_written(tmp_path / "written"))
    assert [c["holds"] for c in record["claims"]] == [True, True]
    assert "discussion.md:4" in record["claims"][0]["source"]
    # the written section as printed (a quote elsewhere, the README's, is checked against it); the others drafts
    assert list(record["written"]) == ["discussion"]
    assert "loses -10.0 points on screw." in record["written"]["discussion"]
    assert "[[claim" not in record["written"]["discussion"] and "{{=" not in record["written"]["discussion"]
    html = (tmp_path / "paper" / "report.html").read_text()
    assert "[[claim" not in html and "Claims of the written text" in html


def test_an_altered_result_fails_the_build_on_the_claim_that_depended_on_it(study, tmp_path) -> None:
    copy = tmp_path / "syn"
    shutil.copytree(study, copy)
    manifest = copy / "study.json"  # its jobs name their folders: the copy's
    manifest.write_text(manifest.read_text().replace(str(study), str(copy)))
    for seed in (0, 1):  # channel_mean on screw now scores as the baseline does (its scores.csv too)
        aurocs = {"bottle": CHANNEL[seed]["bottle"], "screw": BASE[seed]["screw"]}
        write_run(copy / "variants" / f"channel_mean_seed{seed}", _make_config,
                  ("patchcore.embedder.aggregation=channel_mean", f"seed={seed}"), aurocs, images=10)
    out, written = tmp_path / "paper", _written(tmp_path / "written")
    with pytest.raises(ClaimError) as failed:
        build_paper([copy], out, written=written)
    message = str(failed.value)
    assert "1 claim of the written text does not hold" in message
    assert "discussion.md:6: diff(mvtec/variants | channel_mean | image_auroc | screw) < -5: value 0.0" in message
    assert not (out / "report.pdf").exists()  # nothing written
    record = build_paper([copy], out, written=written, mark_claims=True)
    assert [c["holds"] for c in record["claims"]] == [True, False]
    assert "claim does not hold" in (out / "report.html").read_text()


def test_a_study_without_written_text_gets_the_draft(study, tmp_path) -> None:
    record = build_paper([study], tmp_path / "paper", written=tmp_path / "none")
    assert record["claims"] == []


def test_the_shipped_written_text_is_well_formed() -> None:
    """Every written section of the shipped studies (reports/paper/written/<study>/) is a section of the paper,
    prints only known quantities, states its claims as conditions, and cites only known references; whether the
    claims hold is checked when its study is reported (make report)."""
    import re

    import yaml

    from experiments.reporting.claims import CALL, CONDITION, MARKUP
    from experiments.reporting.paper import SECTIONS, SOURCES, WRITTEN

    names = set(Quantities([]).names)
    references = set(yaml.safe_load((SOURCES / "references.yml").read_text()))
    files = sorted(WRITTEN.glob("*/*.md"))
    assert files, "no written text shipped"
    for path in files:
        assert path.stem in SECTIONS, path
        source = path.read_text()
        for match in MARKUP.finditer(source):
            text = " ".join((match.group("number") or match.group("claim")).split())
            if match.group("claim"):
                found = CONDITION.match(text)
                assert found, f"{path}: {text}"
                text = found.group("quantity")
            call = CALL.match(text)
            assert call and call.group(1) in names, f"{path}: {text}"
        cited = set(re.findall(r"(?<![\w`])@([a-z_0-9]+)", source))
        assert cited <= references, f"{path}: {cited - references}"


def test_a_study_of_several_datasets_is_quoted_by_dataset_and_comparison(tmp_path) -> None:
    """In a study of several datasets the comparisons' unique names are ``<dataset>_<comparison>`` (table and
    figure files), but written text and the replication's trends name them as study.json does:
    ``<dataset>/<comparison>``, ``comparison``."""
    import json

    from experiments.reporting.replication import Trend, trend_rows

    copy = _study(tmp_path)  # its own folder: study.json names its runs' folders
    manifest = json.loads((copy / "study.json").read_text())
    manifest["datasets"] = {"mvtec": {"categories": ["bottle", "screw"]}, "elpv": {"categories": ["poly"]}}
    manifest["comparisons"] = {f"mvtec/{name}": {**entry, "dataset": "mvtec", "comparison": name}
                               for name, entry in manifest["comparisons"].items()}
    (copy / "study.json").write_text(json.dumps(manifest))
    inputs = load([copy])
    variants = next(c for c in inputs.present if c.short_name == "variants")
    assert (variants.name, variants.key) == ("mvtec_variants", "mvtec/variants")
    quantities = Quantities(inputs.present)
    assert printed(quantities.value("diff(mvtec/variants | channel_mean | image_auroc | screw)"), "diff") == "-10.0"
    rows = trend_rows([Trend("Aggregation", "-", "variants", "lower", arm="channel_mean")], inputs.present,
                      inputs.datasets)
    assert rows[0][2].text == "mvtec" and rows[0][3].text.startswith("channel_mean: -10.0")
