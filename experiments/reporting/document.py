"""The report's one document model: a tree of blocks that renders to Typst (the PDF), HTML and Markdown
(typst_out.py, html_out.py, markdown_out.py), so the outputs always say the same thing; the paper
(paper.py) and the run digest (digest.py) are both documents of this model.

Written text comes from the sources in ``reports/paper/*.md`` (``parse_source``), a small markup shared by
both outputs: ``#``/``##`` headings, blank-line paragraphs, ``- `` bullets, ``$$ ... $$`` display maths and
``$...$`` inline maths (Typst maths syntax: Typst typesets it in the PDF and renders it to SVG for the
HTML), ``*emphasis*``, ``**strong**``, `` `code` ``, ``@key`` citations (``reports/paper/references.yml``)
and ``{{name}}`` placeholders filled from the runs; ``{{name}}`` alone on a line inserts generated blocks.
A placeholder the runs cannot fill is an error naming it, never an empty sentence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

# math as in TeX's inline rule: no space after the opening $ or before the closing one, and never "${" (a config
# interpolation such as ${category} in an arm's overrides is text)
INLINE = re.compile(r"(\*\*[^*]+\*\*|\*[^*\s][^*]*\*|`[^`]+`|\$(?![\s{])[^$]+(?<!\s)\$|@[a-z][a-z0-9_]*"
                    r"|\{\{[a-z0-9_]+\}\})")
PLACEHOLDER = re.compile(r"\{\{([a-z0-9_]+)\}\}")


@dataclass(frozen=True)
class Span:
    """A piece of inline text: kind is text | em | strong | code | math | cite."""

    kind: str
    text: str


@dataclass
class Heading:
    text: str
    level: int = 1
    numbered: bool = True


@dataclass
class Paragraph:
    spans: list[Span]


@dataclass
class Bullets:
    items: list[list[Span]]


@dataclass
class Equation:
    math: str  # Typst maths syntax


@dataclass
class Code:
    text: str


@dataclass
class Note:
    """A one-line note, e.g. a comparison the runs do not contain."""

    text: str


@dataclass
class Cell:
    text: str
    value: float | None = None        # the number behind the text (sorting, the trace check, the CSV copy)
    bold: bool = False
    std: float | None = None          # its sample std over seeds (the CSV copy's <name>_std.csv)
    sources: list[str] = field(default_factory=list)  # the results.json files the number comes from


@dataclass
class TableBlock:
    name: str
    caption: str
    header: list[str]
    rows: list[list[Cell]]
    rule_before: int | None = None    # a line above this row (the mean row)

    def numeric_columns(self) -> list[bool]:
        """Per column: whether it holds numbers (at least one, every other cell empty or "-"): numbers align
        right, words left (the first column is the rows' names)."""
        return [i > 0 and any(row[i].value is not None for row in self.rows)
                and all(row[i].value is not None or row[i].text.strip() in ("", "-") for row in self.rows)
                for i in range(len(self.header))]


@dataclass
class FigureBlock:
    name: str
    path: str                         # relative to the output folder
    caption: str
    width: float = 1.0                # fraction of the text width


@dataclass
class Gallery:
    """The HTML's browsable anomaly maps: (comparison, arm, category, image path relative to the output)."""

    items: list[tuple[str, str, str, str]]


@dataclass
class Bibliography:
    pass


@dataclass
class PageBreak:
    pass


Block = Heading | Paragraph | Bullets | Equation | Code | Note | TableBlock | FigureBlock | Gallery | Bibliography \
    | PageBreak


@dataclass
class Document:
    title: str
    subtitle: str
    blocks: list[Block]
    references: dict[str, dict]        # key -> Hayagriva entry (references.yml)


# (opening mark, closing mark, kind) of inline markup, the longest marks first
MARKS = (("**", "**", "strong"), ("*", "*", "em"), ("`", "`", "code"), ("$", "$", "math"), ("@", "", "cite"))


def inline(text: str) -> list[Span]:
    """Spans of one paragraph's text (placeholders already filled)."""
    spans: list[Span] = []
    for piece in filter(None, INLINE.split(text)):
        kind, inner = next(((kind, piece[len(a):len(piece) - len(b)]) for a, b, kind in MARKS
                            if piece.startswith(a) and piece.endswith(b) and len(piece) > len(a) + len(b)
                            and INLINE.fullmatch(piece)), ("text", piece))
        spans.append(Span(kind, inner))
    return spans


def render(blocks: list[Block], forms: dict[str, Callable[..., str]], separator: str, output: str) -> str:
    """The blocks in one output format: ``forms`` maps a block's class name to its markup (empty: left out)."""
    def one(block: Block) -> str:
        if type(block).__name__ not in forms:
            raise TypeError(f"no {output} form for {type(block).__name__}")
        return forms[type(block).__name__](block)

    return separator.join(filter(None, map(one, blocks)))


def text(value: str) -> Paragraph:
    """A generated paragraph (the same inline markup as the sources)."""
    return Paragraph(inline(value))


def fill(source: str, values: dict[str, str], origin: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{origin}: placeholder {{{{{name}}}}} has no value (known: {', '.join(sorted(values))})")
        return str(values[name])

    return PLACEHOLDER.sub(replace, source)


def parse_source(source: str, values: dict[str, str], blocks: dict[str, list[Block]], origin: str) -> list[Block]:
    """Blocks of one section source; ``{{name}}`` alone on a line is replaced by ``blocks[name]``."""
    out: list[Block] = []
    chunks = re.split(r"\n\s*\n", source.strip())
    for chunk in chunks:
        chunk = chunk.strip()
        alone = PLACEHOLDER.fullmatch(chunk)
        if alone and alone.group(1) in blocks:
            out.extend(blocks[alone.group(1)])
            continue
        chunk = fill(chunk, values, origin)
        if chunk.startswith("$$") and chunk.endswith("$$"):
            out.append(Equation(chunk[2:-2].strip()))
        elif chunk.startswith("#"):
            level = len(chunk) - len(chunk.lstrip("#"))
            out.append(Heading(chunk[level:].strip(), level))
        elif chunk.startswith("> "):  # a marked stub: text the authors of a study write (claims.py)
            out.append(Note(" ".join(chunk[2:].split())))
        elif chunk.startswith("- "):
            items = re.split(r"\n- ", chunk[2:])
            out.append(Bullets([inline(" ".join(item.split())) for item in items]))
        else:
            out.append(Paragraph(inline(" ".join(chunk.split()))))
    return out


def citation_order(blocks: list[Block]) -> list[str]:
    """Citation keys in order of first use (the HTML's numbering; Typst numbers them the same way)."""
    lines = [[b.spans] if isinstance(b, Paragraph) else b.items if isinstance(b, Bullets) else [] for b in blocks]
    return list(dict.fromkeys(span.text for items in lines for spans in items for span in spans if span.kind == "cite"))
