"""The replication section: the PatchCore paper's published numbers and ablation trends beside this study's runs.

What was published is data (``reports/paper/published.yml``, with its sources); what this suite shows is measured:
the golden-output parity with the official code at build time (parity.py), each ablation trend from the study's
comparison of the same setting with its 95 % interval (stats.paired, the tables' own statistics), and, given
``make bench``'s lines, the speed ratios against the official-style and anomalib-style pipelines. What this machine
could not run is listed with the command that runs it elsewhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from experiments.harness.results import METRIC_TITLES
from experiments.reporting.comparisons import Comparison, categories_of
from experiments.reporting.document import Block, Bullets, Cell, Heading, Note, Span, TableBlock, text
from experiments.reporting.stats import EQUIVALENCE, EQUIVALENT, cell_stats, paired, signed, sources_of, verdict

PUBLISHED = Path(__file__).resolve().parents[2] / "reports" / "paper" / "published.yml"
EXPECTATIONS = {"lower": "lower", "equivalent": EQUIVALENT}  # published trend -> the verdict each arm should get


@dataclass
class Trend:
    """One published ablation and the study's comparison of the same setting (the baseline the published choice)."""

    ablation: str
    published: str
    comparison: str
    expect: str                     # lower | equivalent | none
    arm: str | None = None          # one arm of the comparison (default: every arm)

    def __post_init__(self) -> None:
        if self.expect not in (*EXPECTATIONS, "none"):
            raise ValueError(f"{PUBLISHED}: trends: {self.ablation}: expect={self.expect!r}; use lower, equivalent "
                             "or none")


def load_published(path: Path = PUBLISHED) -> dict:
    """The published numbers, speed, trends (as Trend) and what could not be run."""
    data = yaml.safe_load(path.read_text())
    return {**data, "trends": [Trend(**entry) for entry in data["trends"]]}


def outcome(expect: str, verdicts: list[str]) -> str:
    """Whether the study shows the published trend, from each arm's verdict (its 95 % interval): every arm as
    published -> reproduced; some -> partly; none, with an interval that shows otherwise -> not reproduced; none and
    nothing resolved -> not resolved."""
    if expect == "none":
        return "no published trend"
    wanted = EXPECTATIONS[expect]
    matching = sum(v == wanted for v in verdicts)
    if verdicts and matching == len(verdicts):
        return "reproduced"
    if matching:
        return f"partly reproduced ({matching} of {len(verdicts)} arms)"
    return "not reproduced" if any(v != "not resolved" for v in verdicts) else "not resolved"


def _arm_text(name: str, diff: dict) -> str:
    bounds = "" if math.isnan(diff["low"]) else f" [{signed(diff['low'])}, {signed(diff['high'])}]"
    return f"{name}: {signed(diff['mean'])}{bounds}"


def trend_rows(trends: list[Trend], comparisons: list[Comparison], datasets: list[str]) -> list[list[Cell]]:
    """One row per trend and dataset: the published finding, each arm's difference to the baseline (points, 95 %
    interval) and the outcome; a trend whose comparison the study does not have says so."""
    rows = []
    for trend in trends:
        found = [c for c in comparisons if c.short_name == trend.comparison and c.dataset in datasets]
        if not found:
            rows.append([Cell(trend.ablation), Cell(trend.published), Cell("-"),
                         Cell(f"not in this study (comparison {trend.comparison})"), Cell("not run")])
        for comparison in found:
            arms = [a for a in comparison.others if trend.arm is None or a.name == trend.arm]
            diffs = [(arm.name, paired(comparison.baseline.rows, arm.rows, "image_auroc", categories_of(comparison)))
                     for arm in arms]
            diffs = [(name, diff) for name, diff in diffs if diff is not None]
            shown = "; ".join(_arm_text(name, diff) for name, diff in diffs) or "no arm shares a seed with the baseline"
            rows.append([Cell(trend.ablation), Cell(trend.published),
                         Cell(comparison.dataset), Cell(shown),
                         Cell(outcome(trend.expect, [verdict(diff) for _, diff in diffs]))])
    return rows


def numbers_table(published: list[dict], comparisons: list[Comparison], datasets: list[str]) -> TableBlock:
    """The published numbers, then this study's baseline per dataset in the same columns (PRO the official
    README's convention: over the anomalous test images)."""
    columns = ("image_auroc", "pixel_auroc", "aupro_defect_images")

    def number(value, sources: list[str] | None = None) -> Cell:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return Cell("-")
        # published numbers with their own decimals (99.0, 99.16), this study's to one
        return Cell(f"{value:.1f}" if sources else str(float(value)), float(value), sources=sources or [])

    rows = [[Cell(entry["source"]), Cell(entry["setting"]), Cell("MVTec AD"),
             *(number(entry.get(key)) for key in ("image_auroc", "pixel_auroc", "pro"))] for entry in published]
    for dataset in datasets:
        first = next((c for c in comparisons if c.dataset == dataset), None)
        if first is None:
            continue
        base, categories = first.baseline, categories_of(first)
        values = [cell_stats(base.rows, key, None, categories)[0] if key in base.rows else None for key in columns]
        rows.append([Cell("this study"), Cell(f"{base.runs[0].backbone}, the baseline"),
                     Cell(dataset), *(number(value, sources_of(base.rows)) for value in values)])
    return TableBlock("replication_numbers", "Published PatchCore results on MVTec AD beside this study's baseline "
                      "(mean over categories, %; PRO over the anomalous test images, the official README's "
                      "convention; - : not measured, e.g. no masks). The datasets and backbones differ: the rows "
                      "set the scales side by side, they are not a replication of the numbers.",
                      ["source", "setting", "data", METRIC_TITLES["image_auroc"], METRIC_TITLES["pixel_auroc"],
                       "PRO"], rows)


def parity_table(rows) -> TableBlock:
    """The golden outputs of the official code against this suite's, measured while the paper was built."""
    def small(value: float) -> Cell:
        return Cell("-" if math.isnan(value) else f"{value:.1e}", None if math.isnan(value) else value)

    return TableBlock("replication_parity", "This suite against the official code's own outputs on fixed inputs "
                      "(tests/fixtures/official_parity), measured while this paper was built: the largest absolute "
                      "and relative difference. Float32 rounding differs (the suite pools before it interpolates, "
                      "and folds BatchNorm into the convolutions); tests/test_official_parity.py bounds them.",
                      ["output", "the official code ran", "max |diff|", "max relative"],
                      [[Cell(r.what), Cell(r.note or r.compared), small(r.max_abs), small(r.max_rel)] for r in rows])


class BenchFileError(ValueError):
    """A ``--bench`` file that is not make bench's results.jsonl."""


def read_bench(path: Path) -> list[dict]:
    """make bench's measurement lines, each checked: a JSON object with a stage and finite, positive rates."""
    if not path.is_file():
        raise BenchFileError(f"--bench {path}: no such file; give make bench's results.jsonl "
                             "(outputs/bench/results.jsonl after make bench)")
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchFileError(f"{path}:{number}: not a JSON line ({error}); give make bench's "
                                 "results.jsonl") from None
        rate = record.get("items_per_s") if isinstance(record, dict) else None
        if not isinstance(record, dict) or "stage" not in record or (rate is not None and not (
                isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0)):
            raise BenchFileError(f"{path}:{number}: not a make bench measurement (a JSON object with a stage and a "
                                 f"finite, positive items_per_s): {line[:80]}")
        lines.append(record)
    return lines


def speed_blocks(published: list[dict], bench: Path | None) -> list[Block]:
    """Table 5's GPU times, then the bench's measured ratios on this machine (given its results.jsonl)."""
    said = "; ".join(f"{e['setting']} {e['seconds_per_image']:g} s" for e in published)
    blocks: list[Block] = [text(f"*Speed.* The paper's Table 5 gives per-image times on a GPU, backbone included: "
                                f"{said}. No GPU was available here, so those times were not re-measured.")]
    if bench is None:
        return blocks + [Note("No bench results were given (experiments/report.py --bench "
                              "outputs/bench/results.jsonl after make bench): the speed ratios against the "
                              "official-style and anomalib-style pipelines are in docs/performance.md.")]
    from experiments.benchmarks.table import goals

    lines = read_bench(bench)
    rows = [[Cell(g["goal"]), Cell(g.get("aggregation", "")), Cell(f"{g['ratio']:g}", float(g["ratio"])),
             Cell(g["notes"])] for g in goals(lines)]
    threads = lines[0].get("threads") if lines else None
    return blocks + [TableBlock("replication_speed", f"Speed ratios measured side by side by make bench on this "
                                f"machine's CPU ({threads} threads; {bench}): this suite against the official-style "
                                "and anomalib-style pipelines on the same images and weights.",
                                ["measured", "aggregation", "ratio", "numbers"], rows)]


def replication_blocks(comparisons: list[Comparison], datasets: list[str], bench: Path | None = None,
                       published: dict | None = None, parity_rows: tuple | None = None) -> list[Block]:
    """The section's generated part: published numbers, parity, trends, speed, and what was not run."""
    from experiments.reporting.parity import measure

    published = published or load_published()
    parity_rows = measure() if parity_rows is None else parity_rows
    trends = TableBlock("replication_trends", "The paper's ablations beside this study's comparisons of the same "
                        "setting: each arm's difference in mean image AUROC to the baseline (the published choice), "
                        f"in points with its 95% interval; reproduced where every arm's interval shows the published "
                        f"direction (lower; equivalent: inside ±{EQUIVALENCE:g} points).",
                        ["ablation", "published", "data", "this study (arm: difference [95% interval])", "outcome"],
                        trend_rows(published["trends"], comparisons, datasets))
    missing = [[Span("strong", entry["what"]), Span("text", f": {entry['why']}. Run: "),
                Span("code", entry["command"]), Span("text", f" ({entry['time']}).")]
               for entry in published["not_run"]]
    return [Heading("Published numbers", 2), numbers_table(published["numbers"], comparisons, datasets),
            Heading("Parity with the official code", 2), parity_table(parity_rows),
            Heading("Ablation trends", 2), trends, *speed_blocks(published["speed"], bench),
            Heading("What could not be run here", 2), Bullets(missing)]
