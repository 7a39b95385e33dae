"""The replication section (experiments/reporting/replication.py): the outcome of a published trend follows each
arm's interval, trends are read from a synthetic study's comparisons, and the published data is complete and
names comparisons the shipped studies run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from experiments.reporting.comparisons import categories_of, load
from experiments.reporting.replication import PUBLISHED, Trend, load_published, outcome, trend_rows
from experiments.reporting.stats import EQUIVALENT, paired, signed
from tests.conftest import CONF_DIR
from tests.test_report_paper import _study


def test_outcome_follows_every_arms_verdict() -> None:
    assert outcome("lower", ["lower", "lower"]) == "reproduced"
    assert outcome("lower", ["lower", "not resolved"]) == "partly reproduced (1 of 2 arms)"
    assert outcome("lower", ["higher", EQUIVALENT]) == "not reproduced"
    assert outcome("lower", ["not resolved", "not resolved"]) == "not resolved"
    assert outcome("equivalent", [EQUIVALENT, EQUIVALENT, EQUIVALENT]) == "reproduced"
    assert outcome("equivalent", ["lower", EQUIVALENT]) == "partly reproduced (1 of 2 arms)"
    assert outcome("equivalent", ["higher"]) == "not reproduced"
    assert outcome("none", ["higher"]) == "no published trend"
    assert outcome("lower", []) == "not resolved"
    with pytest.raises(ValueError, match="expect='worse'"):
        Trend("k", "-", "num_neighbors", "worse")


def test_trends_are_read_from_the_studys_comparisons(tmp_path) -> None:
    inputs = load([_study(tmp_path)], None)
    trends = [Trend("Aggregation", "channel mean lower", "variants", "lower", arm="channel_mean"),
              Trend("Aggregation (as equivalent)", "-", "variants", "equivalent", arm="channel_mean"),
              Trend("Neighbourhood size p", "p = 3 best", "patch_size", "lower")]
    rows = [[cell.text for cell in row] for row in trend_rows(trends, inputs.comparisons, inputs.datasets)]
    # channel_mean is 10 points below the baseline (tests/test_report_paper.py), but 10 test images per category
    # leave the bootstrap interval reaching 0: neither the published direction nor equivalence is shown
    inputs_variants = next(c for c in inputs.comparisons if c.name == "variants")
    arm = next(a for a in inputs_variants.others if a.name == "channel_mean")
    diff = paired(inputs_variants.baseline.rows, arm.rows, "image_auroc", categories_of(inputs_variants))
    assert rows[0][3] == f"channel_mean: -10.0 [{signed(diff['low'])}, {signed(diff['high'])}]"
    assert diff["high"] > -1e-9 and rows[0][4] == rows[1][4] == "not resolved"
    assert rows[2][2:] == ["-", "not in this study (comparison patch_size)", "not run"]


def test_published_data_names_comparisons_the_shipped_studies_run() -> None:
    published = load_published()
    assert {e["source"] for e in published["numbers"]} >= {"paper, Tables 1-2", "paper, Table 4"}
    assert all(not math.isnan(e["image_auroc"]) for e in published["numbers"])
    assert [e["seconds_per_image"] for e in published["speed"]] == [0.6, 0.22, 0.17]
    assert all(set(e) == {"what", "why", "command", "time"} for e in published["not_run"])
    for study in ("default", "replication"):
        config = yaml.safe_load((Path(CONF_DIR) / "study" / f"{study}.yaml").read_text())
        assert {t.comparison for t in published["trends"]} <= set(config["comparisons"]), study
    assert PUBLISHED.name == "published.yml"


def test_bench_results_are_checked_and_their_ratios_printed(tmp_path) -> None:
    """--bench: a missing file, a line that is not JSON, not a measurement, or with a rate that is not a finite
    positive number is refused naming the file and line; a good file's prediction goal is printed as make bench
    computes it (experiments/benchmarks/table.goals)."""
    import json

    from experiments.benchmarks.prediction import OFFICIAL_STYLE
    from experiments.benchmarks.searches import DEFAULT
    from experiments.reporting.replication import BenchFileError, read_bench, speed_blocks

    with pytest.raises(BenchFileError, match="no such file"):
        read_bench(tmp_path / "absent.jsonl")
    for bad, why in (("{oops", "not a JSON line"), ("[1, 2]", "not a make bench measurement"),
                     ('{"stage": "predict", "items_per_s": NaN}', "not a make bench measurement"),
                     ('{"items_per_s": 3.0}', "not a make bench measurement")):
        (tmp_path / "bad.jsonl").write_text('{"stage": "fit", "items_per_s": 2.0}\n' + bad + "\n")
        with pytest.raises(BenchFileError, match=f"bad.jsonl:2: {why}"):
            read_bench(tmp_path / "bad.jsonl")
    lines = [{"stage": "predict", "variant": variant, "items_per_s": rate, "threads": 2, "aggregation": "official"}
             for variant, rate in ((OFFICIAL_STYLE, 10.0), (DEFAULT, 43.0))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = speed_blocks([{"setting": "coreset 1 %", "seconds_per_image": 0.17}], tmp_path / "results.jsonl")[-1]
    assert [cell.text for cell in table.rows[0]][:3] == ["prediction vs official-style pipeline", "official", "4.3"]
