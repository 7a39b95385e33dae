"""Numbers and claims in the written prose, computed from the runs and checked by every build.

The paper's interpretation (introduction, discussion, conclusion) is written by people, per study, in
``reports/paper/written/<study>/<section>.md`` (it replaces ``reports/paper/<section>.md`` for that study; a
study without written text gets the generated draft with marked stubs). Such text never types a result:

- ``{{= quantity}}`` is a number (or verdict) from the runs, e.g. ``{{= diff(textures/finetuning | rotation |
  image_auroc | grass)}}``;
- ``[[claim: quantity op value]]`` after a sentence declares the condition on the results that the sentence
  rests on, e.g. ``[[claim: verdict(textures/finetuning | rotation | image_auroc) is not resolved]]`` or
  ``[[claim: diff(elpv/finetuning | rotation | image_auroc | poly) within 0.5]]``. The marker is not printed.

``make report`` evaluates every claim; one the numbers no longer support fails the build with the claim, its
numbers and the file:line (``--mark-failed-claims`` renders the sentence visibly marked instead), so no stale
sentence survives a re-run. A quantity is a name from ``QUANTITIES`` with ``|``-separated arguments (arm names
may hold commas); nothing in a source is evaluated as code.

Quantities (``cmp`` is ``<dataset>/<comparison>``; ``category`` optional, else the mean over the categories):
``mean(cmp | arm | metric [| category])`` in %, ``diff``/``low``/``high``/``interval``/``verdict(cmp | arm |
metric [| category])`` the paired difference to the baseline in points (stats.paired, as the tables print it),
``seeds(cmp | arm)``, the proxy's agreement with the test (finetune_evidence): ``proxy_spearman``,
``proxy_same_sign``, ``proxy_points``, ``proxy_kept(dataset or all)``, and a fine-tuned arm's checkpoint records:
``checkpoints(cmp | arm)`` (category x seed), ``kept_pretrained(cmp | arm)`` (how many kept the pretrained weights),
``weight_change(cmp | arm)`` (the largest ||w - w0|| / ||w0|| at the last evaluation, %), ``train_accuracy(cmp |
arm)`` (the task's mean training accuracy at the end) and ``chance_accuracy(cmp | arm)`` (its chance level).
``gap(cmp | arm | other | metric [| category])`` is ``mean`` of ``other`` minus ``mean`` of ``arm`` in points (no
interval: for "within a tenth of a point of" between two arms). A selection comparison (selection_tables) has
two more arms for ``mean``/``diff``/``gap``/...: ``label-free choice`` and ``oracle (test set)`` (image AUROC; the
baseline is the defaults), and ``selection_spearman(cmp [| category])`` (the proxy's rank agreement with the test:
a category's mean over seeds, else the mean over categories), ``chosen(cmp | category)`` and ``oracle(cmp |
category)`` (the candidates, as words).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from experiments.reporting.comparisons import Comparison, categories_of
from experiments.reporting.finetune_evidence import agreement, tuned_points, units
from experiments.reporting.selection_tables import CHOICE, ORACLE, SelectionNumbers, category_rho, selection_numbers
from experiments.reporting.stats import EQUIVALENT, cell_stats, interval, paired, signed, verdict
from experiments.reporting.tables import PAIRED_METRICS, paired_rows

# ``{{= quantity}}`` or `` [[claim: condition]]`` (the space before a claim goes with it)
# (a claim may end in "]", e.g. a list of layers: its marker closes at the last of "]]]")
MARKUP = re.compile(r"\{\{=\s*(?P<number>.+?)\s*\}\}|\s*\[\[claim:\s*(?P<claim>.+?)\s*\]\](?!\])", re.S)
CALL = re.compile(r"^([a-z_]+)\((.*)\)$", re.S)
VERDICTS = ("higher", "lower", EQUIVALENT, "not resolved")  # the words verdict(...) takes (stats.verdict)
OPS = ("<=", ">=", "<", ">", "within", "is not", "is")
CONDITION = re.compile(r"^(?P<quantity>[a-z_]+\(.*\))\s+(?P<op>" + "|".join(re.escape(o) for o in OPS)
                       + r")\s+(?P<value>.+)$", re.S)


class ClaimError(ValueError):
    """A claim of the written text that the runs do not support (every failing one, with file:line)."""


@dataclass
class Claim:
    source: str        # file:line
    condition: str
    value: str         # the quantity's value as printed
    holds: bool
    why: str = ""      # the reason when it could not be evaluated

    def record(self) -> dict:
        return {"source": self.source, "claim": self.condition, "value": self.value, "holds": self.holds,
                **({"why": self.why} if self.why else {})}


class Quantities:
    """The named quantities of the runs that written text may print or claim."""

    def __init__(self, comparisons: list[Comparison]) -> None:
        self.comparisons = {c.key: c for c in comparisons}
        self._paired: dict[tuple, dict] = {}   # a bootstrap per difference, however often the text quotes it
        self._points: dict[str, list] = {}      # each comparison's fine-tuned checkpoints, their sidecars read once
        self._units: list | None = None
        self._selections: dict[str, SelectionNumbers] = {}
        self.names: dict[str, Callable[..., object]] = {
            "mean": self.mean, "diff": lambda *a: self.paired(*a)["mean"], "low": lambda *a: self.paired(*a)["low"],
            "high": lambda *a: self.paired(*a)["high"], "interval": lambda *a: interval(self.paired(*a)),
            "verdict": lambda *a: verdict(self.paired(*a)), "seeds": self.seeds,
            "proxy_spearman": lambda d="all": self.proxy(d)["spearman"],
            "proxy_same_sign": lambda d="all": self.proxy(d)["same_sign"],
            "proxy_points": lambda d="all": self.proxy(d)["n"],
            "proxy_kept": lambda d="all": self.proxy(d)["kept_start"],
            "checkpoints": lambda key, arm: len(self.tuned(key, arm, "selected_step")),
            "kept_pretrained": lambda key, arm: sum(p.selected_step == 0 for p in self.tuned(key, arm,
                                                                                           "selected_step")),
            "weight_change": lambda key, arm: 100 * max(p.weight_change_last for p in self.tuned(
                key, arm, "weight_change_last")),
            "train_accuracy": lambda key, arm: float(np.mean([p.accuracy for p in self.tuned(key, arm, "accuracy")])),
            "chance_accuracy": lambda key, arm: float(np.mean([p.chance for p in self.tuned(key, arm, "chance")])),
            "selection_spearman": lambda key, category=None: category_rho(
                self.selection(key), category and self._categories(self.comparison(key), category)[0]),
            "gap": lambda key, arm, other, metric, category=None: (
                self.mean(key, other, metric, category) - self.mean(key, arm, metric, category)),
            "chosen": self.chosen,
            "oracle": lambda key, category: self.selection(key).oracle.get(
                self._categories(self.comparison(key), category)[0], "-"),
        }

    def comparison(self, key: str) -> Comparison:
        if key not in self.comparisons:
            raise LookupError(f"no comparison {key!r} in these runs (known: {', '.join(sorted(self.comparisons))})")
        return self.comparisons[key]

    def arm(self, key: str, name: str):
        comparison = self.comparison(key)
        found = next((arm for arm in comparison.arms if arm.name == name), None)
        if found is None:
            raise LookupError(f"no arm {name!r} in {key} (arms: {', '.join(a.name for a in comparison.arms)})")
        return comparison, found

    def selection(self, key: str) -> SelectionNumbers:
        """A selection comparison's numbers (the tables'), computed once."""
        if key not in self._selections:
            found = selection_numbers(self.comparison(key))
            if found is None:
                raise LookupError(f"{key} is not a selection comparison with a baseline")
            self._selections[key] = found
        return self._selections[key]

    def rows(self, key: str, name: str) -> tuple[Comparison, object]:
        """(the comparison, the arm's tidy rows): an arm's, or a selection's label-free choice or oracle."""
        comparison = self.comparison(key)
        if name in (CHOICE, ORACLE) and comparison.selection is not None:
            found = self.selection(key)
            return comparison, found.choice if name == CHOICE else found.oracle_rows
        return comparison, self.arm(key, name)[1].rows

    def chosen(self, key: str, category: str) -> str:
        """The candidate the label-free selection chose for a category (per seed where the seeds differ)."""
        category = self._categories(self.comparison(key), category)[0]
        picks = {seed: arm for (seed, cat), arm in sorted(self.selection(key).chosen.items()) if cat == category}
        if not picks:
            raise LookupError(f"no label-free choice for {category} in {key}")
        if len(set(picks.values())) == 1:
            return next(iter(picks.values()))
        return "; ".join(f"seed {seed}: {arm}" for seed, arm in picks.items())

    def _categories(self, comparison: Comparison, category: str | None) -> list[str]:
        known = categories_of(comparison)
        if category is not None and category not in known:
            raise LookupError(f"no category {category!r} in {comparison.key} "
                              f"(categories: {', '.join(known)})")
        return [category] if category else known

    def mean(self, key: str, arm: str, metric: str, category: str | None = None) -> float:
        comparison, rows = self.rows(key, arm)
        categories = self._categories(comparison, category)
        return cell_stats(rows, metric, category, categories)[0]

    def paired(self, key: str, arm: str, metric: str, category: str | None = None) -> dict:
        if (key, arm, metric, category) not in self._paired:
            comparison, rows = self.rows(key, arm)
            pooled = category is None and metric == "image_auroc" and comparison.selection is not None
            if pooled and arm in (CHOICE, ORACLE):
                # the selection tables' own differences
                found = self.selection(key)
                diff = found.choice_diff if arm == CHOICE else found.oracle_diff
            elif category is None and metric in PAIRED_METRICS and arm != comparison.baseline.name:
                # the tables' own difference, bootstrapped once
                diff = next(d for name, m, d in paired_rows(comparison) if name == arm and m == metric)
            else:
                diff = paired(comparison.baseline.rows, rows, metric, self._categories(comparison, category))
            if diff is None:
                raise LookupError(f"{arm} shares no seed and category with the baseline of {key}")
            self._paired[key, arm, metric, category] = diff
        return self._paired[key, arm, metric, category]

    def seeds(self, key: str, arm: str) -> int:
        return len(self.arm(key, arm)[1].seeds)

    def proxy(self, dataset: str) -> dict:
        if self._units is None:
            self._units = units([p for key in self.comparisons for p in self.points(key)])
        found = self._units if dataset == "all" else [u for u in self._units if u.dataset == dataset]
        if not found:
            raise LookupError(f"no fine-tuned arm with a checkpoint record on {dataset!r}")
        return agreement(found)

    def points(self, key: str) -> list:
        """The comparison's fine-tuned checkpoints (finetune_evidence.TunedPoint), read once."""
        if key not in self._points:
            self._points[key] = tuned_points(self.comparison(key))
        return self._points[key]

    def tuned(self, key: str, arm: str, record: str) -> list:
        """The arm's fine-tuned checkpoints, every one holding ``record``."""
        self.arm(key, arm)  # an unknown arm is named as such
        points = [p for p in self.points(key) if p.arm == arm]
        if not points or any(getattr(p, record) is None for p in points):
            raise LookupError(f"{arm} in {key} has no fine-tuned checkpoint with a complete record ({record})")
        return points

    def value(self, text: str) -> object:
        """The value of ``name(arg | arg ...)``."""
        call = CALL.match(text.strip())
        if call is None or call.group(1) not in self.names:
            raise LookupError(f"{text!r} is not a quantity: write name(arg | ...) with a name of "
                              f"{', '.join(self.names)}")
        args = [a.strip() for a in call.group(2).split("|")] if call.group(2).strip() else []
        try:
            return self.names[call.group(1)](*args)
        except TypeError:
            raise LookupError(f"{text!r}: wrong number of arguments") from None


def printed(value: object, quantity: str) -> str:
    """A quantity as the text prints it: differences signed (stats.signed: never rounded onto 0 or ±0.5 on the
    wrong side), means and correlations with their own decimals, words as they are."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        name = quantity.split("(", 1)[0]
        if math.isnan(value):
            return "-"
        if name in ("diff", "low", "high", "gap"):
            return signed(value)
        if name == "selection_spearman":
            return f"{value:+.2f}"
        two = ("proxy_spearman", "weight_change", "train_accuracy", "chance_accuracy")
        return f"{value:.2f}" if name in two else f"{value:.1f}"
    return str(value)


def _holds(value: object, op: str, expected: str) -> bool:
    if op in ("is", "is not"):
        return (str(value) == expected) == (op == "is")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise LookupError(f"{op} needs a number, the quantity is {value!r}")
    try:
        bound = float(expected.lstrip("±"))
    except ValueError:
        raise LookupError(f"{expected!r} is not a number") from None
    return {"<": value < bound, "<=": value <= bound, ">": value > bound, ">=": value >= bound,
            "within": abs(value) <= bound}[op]


def check(condition: str, quantities: Quantities, source: str) -> Claim:
    """Evaluate one claim's condition (never raises: a claim that cannot be evaluated does not hold)."""
    match = CONDITION.match(condition.strip())
    if match is None:
        return Claim(source, condition, "-", False, f"not a claim: write quantity op value, op one of {OPS}")
    quantity, op, expected = match.group("quantity"), match.group("op"), match.group("value").strip()
    if op == "is not" and f"not {expected}" in VERDICTS:
        op, expected = "is", f"not {expected}"  # "is not resolved" is the verdict, not a negation of "resolved"
    try:
        value = quantities.value(quantity)
        return Claim(source, condition, printed(value, quantity), _holds(value, op, expected))
    except LookupError as error:
        return Claim(source, condition, "-", False, str(error))


def resolve(source: str, origin: str, quantities: Quantities, mark: bool) -> tuple[str, list[Claim]]:
    """``source`` with its numbers filled and its claim markers evaluated and removed (a failing claim's
    sentence marked when ``mark``); the claims with file:line (a marker may wrap over lines, as prose does)."""
    claims: list[Claim] = []

    def replace(match: re.Match) -> str:
        start = match.start("number") if match.group("number") is not None else match.start("claim")
        where = f"{origin}:{source.count(chr(10), 0, start) + 1}"
        if match.group("number") is not None:
            quantity = " ".join(match.group("number").split())
            try:
                return printed(quantities.value(quantity), quantity)
            except LookupError as error:
                claims.append(Claim(where, f"{{{{= {quantity}}}}}", "-", False, str(error)))
                return "**[no value]**"
        claim = check(" ".join(match.group("claim").split()), quantities, where)
        claims.append(claim)
        return "" if claim.holds or not mark else f" **[claim does not hold: {claim.condition} ({claim.value})]**"

    return MARKUP.sub(replace, source), claims


def failure(claims: list[Claim]) -> ClaimError | None:
    """The error that names every failing claim, with its numbers and file:line (None when all hold)."""
    failed = [c for c in claims if not c.holds]
    if not failed:
        return None
    lines = [f"{c.source}: {c.condition}: value {c.value}" + (f" ({c.why})" if c.why else "") for c in failed]
    count = f"{len(failed)} claim{'s' if len(failed) > 1 else ''} of the written text"
    return ClaimError(f"{count} {'do' if len(failed) > 1 else 'does'} not hold for these runs (fix the text, or "
                      "run make report with --mark-failed-claims to see them marked in the paper):\n"
                      + "\n".join(lines))
