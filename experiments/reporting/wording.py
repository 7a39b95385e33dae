"""How generated text words things, in one place: counts with the right singular or plural (never "3 seed(s)"),
titles lowered in running text without lowering their acronyms ("L2-SP", "CAE"), arm names sorted as numbers
where they hold numbers (train_limit=1, 2, 16), and the one-line reason an arm could not run (the full error
text stays in study.json: the paper never prints URLs, cache paths or tracebacks)."""

from __future__ import annotations

import re

IRREGULAR = {"category": "categories", "this": "these", "is": "are", "was": "were"}


def noun(n: int | float, word: str) -> str:
    """``word`` in the form that goes with ``n`` (``noun(2, "seed")`` -> "seeds")."""
    if n == 1:
        return word
    if word in IRREGULAR:
        return IRREGULAR[word]
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + ("es" if re.search(r"(s|x|z|ch|sh)$", word) else "s")


def plural(n: int | float, word: str) -> str:
    """``n`` and ``word`` in its form for ``n``: "1 seed", "3 seeds", "2 categories"."""
    return f"{n:g} {noun(n, word)}" if isinstance(n, float) else f"{n} {noun(n, word)}"


_TEMPLATE = re.compile(r"(\{\{(\w+)\}\}) ([A-Za-z-]+)\(s\)")


def pluralise_template(source: str, values: dict[str, str]) -> str:
    """A written source's ``{{name}} word(s)`` made ``{{name}} words`` or ``{{name}} word`` by the value the
    placeholder will get, so a template may count without knowing the number."""
    def replace(match: re.Match) -> str:
        value = values.get(match.group(2))
        try:
            n = float(value)
        except (TypeError, ValueError):
            return f"{match.group(1)} {noun(2, match.group(3))}"
        return f"{match.group(1)} {noun(n, match.group(3))}"

    return _TEMPLATE.sub(replace, source)


def lower_first(title: str) -> str:
    """A title in running text: its first word lowered unless it is an acronym or a name with capitals inside
    ("Fine-tuning without and with a stronger L2-SP" -> "fine-tuning without and with a stronger L2-SP", "CAE
    baselines" stays)."""
    first = title.split(" ", 1)[0]
    if not first or any(ch.isupper() for ch in first[1:]) or any(ch.isdigit() for ch in first):
        return title
    return first[0].lower() + title[len(first[0]):]


def listing(items: list[str], empty: str = "none") -> str:
    """"a", "a and b", "a, b and c"."""
    items = list(items)
    if not items:
        return empty
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def breakable(name: str) -> str:
    """An arm's name with room to break a line (a table cell, a figure title): a selection candidate has few
    spaces, "layers:backbone.layers=[blocks.2,blocks.4]" -> "layers: backbone.layers=[blocks.2, blocks.4]"."""
    return name.replace(":", ": ", 1).replace(",", ", ")


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: train_limit=1, train_limit=2, train_limit=16."""
    return [(0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part.lower())
            for part in re.split(r"(\d+(?:\.\d+)?)", name) if part]


# Raw reason (study.json, a job's status) -> the line the paper prints: the first pattern that matches.
REASONS = (
    # the weights' message names the cache folder .../hub/checkpoints/: it is matched before "checkpoint"
    (r"WeightsNotFoundError|pretrained weights", "pretrained weights not on this machine"),
    (r"checkpoint outside the study", "a fine-tuned checkpoint from outside the study (the study's own are its "
                                      "fine-tuning comparisons)"),
    (r"checkpoint", "fine-tuned checkpoint missing on this machine"),
    (r"random weights", "its config has random weights"),
    (r"weights not available|weights", "pretrained weights not on this machine"),
    (r"baseline has no complete run", "the baseline has no complete run"),
    (r"not run yet|pending", "not run yet"),
    (r"interrupted|running", "interrupted"),
    (r"blocked", "blocked by a failed job it needs"),
    (r"fail", "job failed"),
)


def short_reason(reason: str) -> str:
    """One line for why an arm is not in a comparison, never the raw error text (which names URLs, cache paths
    and exception types). Seeds named in the reason ("seed 0: failed; seed 1: failed") are kept."""
    seeds = re.findall(r"seed (\d+):", reason)
    said = next((line for pattern, line in REASONS if re.search(pattern, reason, flags=re.IGNORECASE)),
                "could not run (the reason is in study.json)")
    return f"{said} ({noun(len(seeds), 'seed')} {listing(seeds)})" if seeds else said
