"""The document model as Markdown: the run digest's ``digest.md`` and every table's ``.md`` copy. The same
blocks as the Typst PDF and the HTML, so a number reads the same in all three."""

from __future__ import annotations

from experiments.reporting.document import Document, Span, TableBlock, render

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


FORMS = {"Heading": lambda b: "#" * (b.level + 1) + " " + b.text + "\n", "Paragraph": lambda b: spans(b.spans) + "\n",
         "Bullets": lambda b: "\n".join("- " + spans(entry) for entry in b.items) + "\n",
         "Equation": lambda b: f"$$ {b.math} $$\n", "Code": lambda b: f"```\n{b.text}\n```\n",
         "Note": lambda b: f"> *{b.text}*\n", "TableBlock": table,
         "FigureBlock": lambda b: f"![{b.name}]({b.path})\n\n{b.caption}\n",
         # the gallery is the HTML's; the digest cites nothing
         **dict.fromkeys(("Gallery", "Bibliography", "PageBreak"), lambda b: "")}


def to_markdown(doc: Document) -> str:
    head = f"# {doc.title}\n\n{doc.subtitle}\n"
    return "\n".join(filter(None, [head, render(doc.blocks, FORMS, "\n", "Markdown")]))
