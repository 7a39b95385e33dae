"""The document model as Typst markup, compiled to PDF in-process by the ``typst`` package (offline: Typst
ships its fonts). Citations and the bibliography are Typst's own (``references.yml``, Hayagriva format).

Then the automated half of "no overflowing text or tables" (the other half is looking at the pages:
``typst compile reports/report.typ 'page-{p}.png'``): the pages, rendered by the compiler that wrote the PDF,
must put no ink (a pixel darker than ``INK``) into the strip between the paper's edge and the text column, less
a small tolerance for anti-aliasing."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.reporting.document import Document, Span, TableBlock, render

# ";" too: right after an embedded expression (a citation, code) Typst takes it as the expression's end and drops it
_SPECIAL = re.compile(r"([\\#$*_`@<>\[\]~/=+\-;])")
PAGE_WIDTH_CM, MARGIN_X_CM = 21.0, 2.0  # A4 and its side margins: the preamble and the layout check read them
INK = 200              # grey level (0 black, 255 white) below which a pixel is ink
TOLERANCE_CM = 0.1     # anti-aliased glyph edges may touch the text column's border by this much
PREAMBLE = f"""#set document(title: {{title}})
#set page(paper: "a4", margin: (x: {MARGIN_X_CM}cm, y: 2.2cm), numbering: "1")
#set text(size: 10pt)
#set par(justify: true)
#show table: set par(justify: false)
#show figure.where(kind: table): set block(breakable: true)
#set heading(numbering: "1.1")
#show heading: set block(above: 1.2em, below: 0.7em)
#show figure.caption: set text(size: 8.5pt)
#show raw.where(block: true): set text(size: 7pt)
#show figure.where(kind: table): set figure.caption(position: top)
"""


def label(kind: str, name: str) -> str:
    """A Typst label for a table or figure: names come from arm names ("rotation (l2sp=0)"), and a label may
    hold only letters, digits, ``_``, ``-``, ``.`` and ``:``."""
    return f"<{kind}-{re.sub(r'[^A-Za-z0-9_.:-]', '_', name)}>"


def escape(text: str) -> str:
    """Plain text as Typst markup: every markup character escaped (``/`` too: ``//`` starts a comment)."""
    return _SPECIAL.sub(r"\\\1", text).replace("\n", " ")


def string(text: str) -> str:
    """A Typst string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_SPANS = {"text": escape, "em": lambda t: f"#emph[{escape(t)}]", "strong": lambda t: f"#strong[{escape(t)}]",
          "code": lambda t: f"#raw({string(t)})", "math": lambda t: f"${t}$", "cite": lambda t: f"#cite(<{t}>)"}


def spans(items: list[Span]) -> str:
    return "".join(_SPANS[span.kind](span.text) for span in items)


def _table(block: TableBlock) -> str:
    columns = len(block.header)
    cells = [f"[#strong[{escape(h)}]]" for h in block.header]
    lines = ["table.hline(stroke: 0.8pt)", ", ".join(cells), "table.hline(stroke: 0.5pt)"]
    for i, row in enumerate(block.rows):
        if block.rule_before is not None and i == block.rule_before:
            lines.append("table.hline(stroke: 0.5pt)")
        shown = [f"[#strong[{escape(c.text)}]]" if c.bold else f"[{escape(c.text)}]" for c in row]
        lines.append(", ".join(shown))
    lines.append("table.hline(stroke: 0.8pt)")
    align = "(" + ", ".join("right" if numeric else "left" for numeric in block.numeric_columns()) + ")"
    size = "8pt" if columns <= 7 else "6.5pt"
    body = ",\n    ".join(lines)
    return (f"#[#set text(size: {size})\n#figure(kind: table, caption: [{escape(block.caption)}],\n"
            f"  table(columns: {columns}, align: {align}, stroke: none, inset: (x: 4pt, y: 2.5pt),\n    {body}))"
            f" {label('tab', block.name)}]")


def _heading(item) -> str:
    if not item.numbered:
        return f"#heading(level: {item.level}, numbering: none)[{escape(item.text)}]"
    return "=" * item.level + " " + escape(item.text)


def _figure(item, floats: bool = False) -> str:
    """A figure; ``floats``: at the top or bottom of a page (Typst's ``placement: auto``), so one that does not
    fit the rest of the page moves to the next page's top while the text goes on filling this one, and no page
    is left half empty in front of a tall figure (the paper, whose figures follow their text)."""
    place = "placement: auto, " if floats else ""
    return (f"#figure(image({string(item.path)}, width: {round(100 * item.width)}%), {place}"
            f"caption: [{escape(item.caption)}]) {label('fig', item.name)}")


FORMS = {"Heading": _heading, "Paragraph": lambda b: spans(b.spans),
         "Bullets": lambda b: "\n".join("- " + spans(entry) for entry in b.items),
         "Equation": lambda b: f"$ {b.math} $", "Code": lambda b: f"#raw(block: true, {string(b.text)})",
         "Note": lambda b: f"#block(fill: luma(242), inset: 5pt, radius: 2pt, width: 100%)[#emph[{escape(b.text)}]]",
         "TableBlock": _table, "FigureBlock": _figure,
         "Gallery": lambda b: "",  # the PDF shows the map grids as figures; the browsable gallery is the HTML's
         "Bibliography": lambda b: '#bibliography("references.yml", title: "References", style: "ieee")',
         "PageBreak": lambda b: "#pagebreak()"}


def block(item) -> str:
    return render([item], FORMS, "", "Typst")


def to_typst(doc: Document, floats: bool = False) -> str:
    """The document's Typst source; ``floats``: figures float (``_figure``)."""
    head = PREAMBLE.format(title=string(doc.title))
    title = (f"#align(center)[#text(size: 16pt, weight: \"bold\")[{escape(doc.title)}]\\\n"
             f"#text(size: 9pt)[{escape(doc.subtitle)}]]\n")
    forms = {**FORMS, "FigureBlock": lambda item: _figure(item, floats)}
    return head + title + render(doc.blocks, forms, "\n\n", "Typst") + "\n"


def write_pdf(doc: Document, out: Path, references: Path | None = None, stem: str = "report",
              floats: bool = False) -> tuple[Path, list[int], int]:
    """``<stem>.typ`` (kept: users can edit and recompile it with ``typst compile``) and ``<stem>.pdf``; also the
    numbers of the pages whose content runs into the side margins (overflowing text or tables), and the
    number of pages. ``floats``: figures float to the top or bottom of a page (``_figure``)."""
    import typst

    source = out / f"{stem}.typ"
    source.write_text(to_typst(doc, floats))
    if references is not None:
        shutil.copyfile(references, out / "references.yml")
    pdf = out / f"{stem}.pdf"
    tmp = out / f"{stem}.pdf.tmp"
    compiler = typst.Compiler(str(source), root=str(out))  # one compiler: the page renders reuse its layout
    compiler.compile(output=str(tmp), format="pdf")
    tmp.replace(pdf)
    pages = render_pages(compiler, ppi=40)
    return pdf, pages_with_margin_ink(pages, MARGIN_X_CM, PAGE_WIDTH_CM), len(pages)


def render_pages(compiler, ppi: float) -> list[bytes]:
    """The pages of a ``typst.Compiler``'s document as PNG bytes, one per page."""
    pages = compiler.compile(format="png", ppi=ppi)
    return pages if isinstance(pages, list) else [pages]


def pages_with_margin_ink(pages: list[bytes], margin_x_cm: float, page_width_cm: float) -> list[int]:
    """1-based numbers of the pages with ink in the left or right margin."""
    found = []
    for number, png in enumerate(pages, 1):
        grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
        per_cm = grey.shape[1] / page_width_cm
        strip = int(round((margin_x_cm - TOLERANCE_CM) * per_cm))
        if strip > 0 and ((grey[:, :strip] < INK).any() or (grey[:, -strip:] < INK).any()):
            found.append(number)
    return found
