"""The document model as Markdown: the run digest's ``digest.md`` and every table's ``.md`` copy. The same
blocks as the Typst PDF and the HTML, so a number reads the same in all three."""

from __future__ import annotations

from experiments.reporting.document import (
    Bibliography,
    Block,
    Bullets,
    Code,
    Document,
    Equation,
    FigureBlock,
    Gallery,
    Heading,
    Note,
    PageBreak,
    Paragraph,
    Span,
    TableBlock,
)

_MARKS = {"text": "{}", "em": "*{}*", "strong": "**{}**", "code": "`{}`", "math": "${}$", "cite": "[{}]"}


def spans(items: list[Span]) -> str:
    return "".join(_MARKS[span.kind].format(span.text) for span in items)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(block: TableBlock) -> str:
    """The caption in bold, then a pipe table (the first column left-aligned, the others right; a bold label
    on the row after the rule, the digest's mean row)."""
    lines = ["| " + " | ".join(map(_cell, block.header)) + " |",
             "|" + "|".join([":---", *["---:"] * (len(block.header) - 1)]) + "|"]
    for i, row in enumerate(block.rows):
        shown = [f"**{_cell(c.text)}**" if c.bold or (j == 0 and i == block.rule_before) else _cell(c.text)
                 for j, c in enumerate(row)]
        lines.append("| " + " | ".join(shown) + " |")
    return f"**{block.caption}**\n\n" + "\n".join(lines) + "\n"


def block(item: Block) -> str:
    if isinstance(item, Heading):
        return "#" * (item.level + 1) + " " + item.text + "\n"
    if isinstance(item, Paragraph):
        return spans(item.spans) + "\n"
    if isinstance(item, Bullets):
        return "\n".join("- " + spans(entry) for entry in item.items) + "\n"
    if isinstance(item, Equation):
        return f"$$ {item.math} $$\n"
    if isinstance(item, Code):
        return f"```\n{item.text}\n```\n"
    if isinstance(item, Note):
        return f"> *{item.text}*\n"
    if isinstance(item, TableBlock):
        return table(item)
    if isinstance(item, FigureBlock):
        return f"![{item.name}]({item.path})\n\n{item.caption}\n"
    if isinstance(item, (Gallery, Bibliography, PageBreak)):
        return ""  # the gallery is the HTML's; the digest cites nothing
    raise TypeError(f"no Markdown form for {type(item).__name__}")


def to_markdown(doc: Document) -> str:
    head = f"# {doc.title}\n\n{doc.subtitle}\n"
    return "\n".join([head, *filter(None, (block(b) for b in doc.blocks))])
