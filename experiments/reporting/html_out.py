"""The document model as one HTML page (``report.html``): the same text, tables and figures as the PDF, with
sortable tables (click a header), a browsable anomaly-map gallery (filter by comparison, category, arm)
and equations typeset by Typst as inline SVG. Images are files next to the page (relative links)."""

from __future__ import annotations

import base64
import functools
import html
import re

from experiments.reporting.document import Document, Span, TableBlock, citation_order, render
from experiments.reporting.wording import natural_key

STYLE = """
body{font-family:Georgia,serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45;color:#222}
h1.title{text-align:center;margin-bottom:.2rem} p.subtitle{text-align:center;color:#555;margin-top:0}
table{border-collapse:collapse;margin:.5rem 0 1.2rem;font-size:.85rem} caption{caption-side:top;text-align:left;
font-size:.85rem;color:#333;padding-bottom:.3rem} th,td{padding:.15rem .5rem;text-align:right}
th:first-child,td:first-child,th.w,td.w{text-align:left}
thead th{border-bottom:1px solid #444;cursor:pointer;user-select:none}
thead th.sorted-asc::after{content:" \\25B2"} thead th.sorted-desc::after{content:" \\25BC"}
tr.rule td{border-top:1px solid #999} figure{margin:1rem 0} figure img{max-width:100%}
figcaption{font-size:.85rem;color:#333} .note{background:#f2f2f2;padding:.4rem .6rem;font-style:italic}
pre{background:#f7f7f7;padding:.5rem;overflow-x:auto;font-size:.75rem} .eq{text-align:center;margin:.6rem 0}
.gallery-controls select{margin-right:.8rem} .gallery{display:flex;flex-wrap:wrap;gap:.6rem}
.gallery figure{width:18rem;margin:0} .gallery figure.hidden{display:none} img.math{vertical-align:middle}
"""

SCRIPT = """
function cellValue(td){const v=td.getAttribute('data-value');return v===null||v===''?null:parseFloat(v)}
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('thead th').forEach(function(th,col){
    th.addEventListener('click',function(){
      const body=table.tBodies[0]; const rows=Array.from(body.rows).filter(r=>!r.classList.contains('pinned'));
      const asc=!th.classList.contains('sorted-asc');
      table.querySelectorAll('thead th').forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
      th.classList.add(asc?'sorted-asc':'sorted-desc');
      rows.sort(function(a,b){const x=cellValue(a.cells[col]),y=cellValue(b.cells[col]);
        if(x===null&&y===null){return a.cells[col].textContent.localeCompare(b.cells[col].textContent)*(asc?1:-1)}
        if(x===null){return 1} if(y===null){return -1} return asc?x-y:y-x});
      const pinned=Array.from(body.rows).filter(r=>r.classList.contains('pinned'));
      rows.concat(pinned).forEach(r=>body.appendChild(r));
    });
  });
});
function filterGallery(){
  const want={}; document.querySelectorAll('.gallery-controls select').forEach(s=>want[s.name]=s.value);
  document.querySelectorAll('.gallery figure').forEach(function(f){
    const show=Object.keys(want).every(k=>want[k]===''||f.dataset[k]===want[k]);
    f.classList.toggle('hidden',!show);
  });
}
document.querySelectorAll('.gallery-controls select').forEach(s=>s.addEventListener('change',filterGallery));
"""


@functools.lru_cache(maxsize=512)
def math_svg(math: str, display: bool) -> str:
    """A data URI of the SVG Typst makes of ``math`` (the same typesetting as the PDF)."""
    import typst

    size = "11pt" if display else "10pt"
    body = f"$ {math} $" if display else f"${math}$"
    svg = typst.compile(f"#set page(width: auto, height: auto, margin: 1pt)\n#set text(size: {size})\n{body}"
                        .encode(), format="svg")
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode()


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Renderer:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.numbers = {key: i + 1 for i, key in enumerate(citation_order(doc.blocks))}

    def spans(self, items: list[Span]) -> str:
        marks = {"text": "{}", "em": "<em>{}</em>", "strong": "<strong>{}</strong>", "code": "<code>{}</code>"}
        out = []
        for span in items:
            text = html.escape(span.text)
            if span.kind == "math":
                out.append(f'<img class="math" alt="{text}" src="{math_svg(span.text, False)}">')
            elif span.kind == "cite":
                out.append(f'<a href="#ref-{text}">[{self.numbers.get(span.text, "?")}]</a>')
            else:
                out.append(marks[span.kind].format(text))
        return "".join(out)

    def table(self, block: TableBlock) -> str:
        words = [' class="w"' if not numeric else "" for numeric in block.numeric_columns()]  # left-aligned
        head = "".join(f"<th{w}>{html.escape(h)}</th>" for h, w in zip(block.header, words))
        rows = []
        for i, row in enumerate(block.rows):
            classes = []
            if block.rule_before is not None and i >= block.rule_before:
                classes.append("pinned")  # the mean row stays last when sorting
            if block.rule_before is not None and i == block.rule_before:
                classes.append("rule")
            cells = []
            for cell, w in zip(row, words):
                value = "" if cell.value is None else f"{cell.value:.6g}"
                shown = f"<strong>{html.escape(cell.text)}</strong>" if cell.bold else html.escape(cell.text)
                title = f' title="{html.escape("; ".join(cell.sources))}"' if cell.sources else ""
                cells.append(f'<td{w} data-value="{value}"{title}>{shown}</td>')
            cls = f' class="{" ".join(classes)}"' if classes else ""
            rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
        return (f'<table class="sortable" id="tab-{block.name}"><caption>{html.escape(block.caption)}</caption>'
                f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")

    def gallery(self, block) -> str:
        controls = []
        for name, index in (("comparison", 0), ("category", 2), ("arm", 1)):
            values = sorted({item[index] for item in block.items}, key=natural_key)
            options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
            controls.append(f'<label>{name} <select name="{name}"><option value="">all</option>{options}</select>'
                            "</label>")
        figures = "".join(
            f'<figure data-comparison="{html.escape(c)}" data-arm="{html.escape(a)}" data-category="{html.escape(k)}">'
            f'<a href="{html.escape(p)}"><img loading="lazy" src="{html.escape(p)}" alt="{html.escape(a)}"></a>'
            f"<figcaption>{html.escape(c)} / {html.escape(a)} / {html.escape(k)}: "
            f"{html.escape(p.rsplit('/', 1)[-1])}</figcaption></figure>"
            for c, a, k, p in block.items)
        return (f'<div class="gallery-controls">{"".join(controls)}</div>'
                f'<div class="gallery" id="gallery">{figures}</div>')

    def bibliography(self) -> str:
        items = []
        for key, number in sorted(self.numbers.items(), key=lambda kv: kv[1]):
            entry = self.doc.references.get(key, {})
            authors = entry.get("author", [])
            authors = ", ".join(authors if isinstance(authors, list) else [authors])
            venue = (entry.get("parent") or {}).get("title", "") if isinstance(entry.get("parent"), dict) else ""
            year = str(entry.get("date", ""))
            title = html.escape(str(entry.get("title", key)))
            items.append(f'<li id="ref-{html.escape(key)}" value="{number}">{html.escape(authors)}. <em>{title}</em>.'
                         f" {html.escape(venue)} {html.escape(year)}.</li>")
        return f"<h2>References</h2><ol>{''.join(items)}</ol>"

    def forms(self) -> dict:
        escape = html.escape

        def heading(b) -> str:
            level = min(b.level + 1, 6)
            return f'<h{level} id="{_anchor(b.text)}">{escape(b.text)}</h{level}>'

        return {
            "Heading": heading,
            "Paragraph": lambda b: f"<p>{self.spans(b.spans)}</p>",
            "Bullets": lambda b: "<ul>" + "".join(f"<li>{self.spans(entry)}</li>" for entry in b.items) + "</ul>",
            "Equation": lambda b: f'<div class="eq"><img class="math" alt="{escape(b.math)}" '
                                  f'src="{math_svg(b.math, True)}"></div>',
            "Code": lambda b: f"<pre>{escape(b.text)}</pre>", "Note": lambda b: f'<p class="note">{escape(b.text)}</p>',
            "TableBlock": self.table,
            "FigureBlock": lambda b: f'<figure id="fig-{b.name}"><a href="{escape(b.path)}"><img '
                                     f'src="{escape(b.path)}" alt="{escape(b.name)}"></a><figcaption>'
                                     f'{escape(b.caption)}</figcaption></figure>',
            "Gallery": self.gallery, "Bibliography": lambda b: self.bibliography(), "PageBreak": lambda b: ""}

    def page(self) -> str:
        body = render(self.doc.blocks, self.forms(), "\n", "HTML")
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.doc.title)}'
                f"</title><style>{STYLE}</style></head><body><h1 class=\"title\">{html.escape(self.doc.title)}</h1>"
                f'<p class="subtitle">{html.escape(self.doc.subtitle)}</p>\n{body}\n<script>{SCRIPT}</script>'
                "</body></html>\n")


def to_html(doc: Document) -> str:
    return _Renderer(doc).page()
