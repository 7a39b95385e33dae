"""A small A4 document writer on matplotlib's PdfPages: headings, wrapped text, booktabs-style tables
and figures, flowed top to bottom onto numbered pages. No LaTeX or other PDF library needed."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from experiments.reporting.tables import Table  # noqa: E402

PAGE = (8.27, 11.69)  # A4, inches
MARGIN = 0.6
WIDTH = PAGE[0] - 2 * MARGIN
CHAR_WIDTH = {False: 0.52, True: 0.60}  # average glyph width in em: DejaVu Sans / DejaVu Sans Mono
MAX_TABLE_COLUMNS = 7


class Document:
    def __init__(self, path: Path, title: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.pdf = PdfPages(self.path, metadata={"Title": title, "Creator": "experiments/report.py"})
        self.title = title
        self.pages = 0
        self.fig = None
        self.y = 0.0  # inches from the top of the page

    # ------------------------------------------------------------------ pages
    def new_page(self) -> None:
        self._flush()
        self.fig = plt.figure(figsize=PAGE)
        self.pages += 1
        self.y = MARGIN
        self.fig.text(0.5, 0.4 / PAGE[1], f"{self.title} - page {self.pages}", ha="center", va="bottom",
                      fontsize=7, color="0.4")

    def _flush(self) -> None:
        if self.fig is not None:
            self.pdf.savefig(self.fig)
            plt.close(self.fig)
            self.fig = None

    def _room(self, height: float) -> None:
        """Start a new page unless ``height`` inches fit below the cursor."""
        if self.fig is None or self.y + height > PAGE[1] - MARGIN:
            self.new_page()

    def _text(self, x: float, y: float, text: str, **kwargs) -> None:
        self.fig.text(x / PAGE[0], 1 - y / PAGE[1], text, va="top", **kwargs)

    # ----------------------------------------------------------------- blocks
    def heading(self, text: str, size: float = 13, keep: float = 1.2) -> None:
        """A section title; a new page unless ``keep`` inches fit below it (no title alone at a page's foot)."""
        lines = textwrap.wrap(text, max(10, int(WIDTH * 72 / (size * 0.62))))  # bold glyphs are wider
        self._room(size / 72 * 1.6 * len(lines) + keep)
        self.y += 0.1
        for line in lines:
            self._text(MARGIN, self.y, line, fontsize=size, fontweight="bold")
            self.y += size / 72 * 1.6

    def paragraph(self, text: str, size: float = 9, mono: bool = False, indent: float = 0.0) -> None:
        chars = max(20, int((WIDTH - indent) * 72 / (size * CHAR_WIDTH[mono])))
        lines = []
        for part in text.split("\n"):
            lines += textwrap.wrap(part, chars, break_long_words=True, subsequent_indent="    " if mono else "") or [""]
        step = size / 72 * 1.35
        for line in lines:
            self._room(step)
            self._text(MARGIN + indent, self.y, line, fontsize=size, family="monospace" if mono else "sans-serif")
            self.y += step
        self.y += step * 0.4

    def bullets(self, items: list[str], size: float = 9, mono: bool = False) -> None:
        for item in items:
            self._room(size / 72 * 1.35)
            self._text(MARGIN, self.y, "-", fontsize=size)
            self.paragraph(item, size=size, mono=mono, indent=0.15)
            self.y -= size / 72 * 1.35 * 0.3

    def table(self, table: Table, size: float = 8) -> None:
        """The table, split into parts of equal width (at most MAX_TABLE_COLUMNS value columns) when wider."""
        parts = max(1, math.ceil(len(table.columns) / MAX_TABLE_COLUMNS))
        per_part = max(1, math.ceil(len(table.columns) / parts))
        for start in range(0, max(1, len(table.columns)), per_part):
            self._table_part(table, range(start, min(start + per_part, len(table.columns))), size)

    def _table_part(self, table: Table, columns: range, size: float) -> None:
        header = [table.corner, *(table.columns[j] for j in columns)]
        rows = [[label, *(cells[j] for j in columns)] for label, cells in zip(table.index, table.cells)]
        bold = [[False, *(flags[j] for j in columns)] for flags in table.bold]
        wrap = 18  # header labels wrap onto several lines
        # wrap at spaces and after "+" (layer lists), never inside a word
        header = [textwrap.fill(h.replace("+", "+ "), wrap, break_long_words=False).replace("+ ", "+")
                  for h in header]
        em = size / 72 * CHAR_WIDTH[False]
        widths = [max(max(len(line) for line in header[i].split("\n")) * 1.15, *(len(r[i]) for r in rows)) * em
                  + 0.2 for i in range(len(header))]  # headers are bold: wider glyphs
        scale = min(1.0, WIDTH / sum(widths))
        size, widths = size * scale, [w * scale for w in widths]
        step = size / 72 * 1.45
        header_lines = max(h.count("\n") + 1 for h in header)
        self._room(step * (header_lines + len(rows) + 4))
        title = table.title + ("" if len(columns) == len(table.columns) else
                               f" (columns {columns.start + 1}-{columns.stop} of {len(table.columns)})")
        self._text(MARGIN, self.y, title, fontsize=size + 1, fontweight="bold")
        self.y += step * 1.3
        self._rule(1.0)
        xs = [MARGIN + sum(widths[:i]) for i in range(len(widths))]
        for i, text in enumerate(header):
            self._cell(xs[i], widths[i], text, size, i == 0, True)
        self.y += size / 72 * 1.25 * header_lines + 0.04
        self._rule(0.5)
        for r, (row, flags) in enumerate(zip(rows, bold)):
            if table.rule_before is not None and r == table.rule_before:
                self._rule(0.5)
            for i, text in enumerate(row):
                self._cell(xs[i], widths[i], text, size, i == 0, flags[i])
            self.y += step
        self._rule(1.0)
        self.paragraph(table.note, size=size - 0.5)

    def _cell(self, x: float, width: float, text: str, size: float, left: bool, bold: bool) -> None:
        self._text(x if left else x + width - 0.05, self.y + 0.02, text, fontsize=size,
                   ha="left" if left else "right", fontweight="bold" if bold else "normal", linespacing=1.1)

    def _rule(self, weight: float) -> None:
        y = 1 - (self.y + 0.03) / PAGE[1]
        self.fig.add_artist(plt.Line2D([MARGIN / PAGE[0], 1 - MARGIN / PAGE[0]], [y, y], lw=weight, color="black"))
        self.y += 0.08

    def image(self, png: Path, caption: str, max_height: float = PAGE[1] - 2 * MARGIN - 1.0) -> None:
        """A figure's PNG at full text width (shrunk to ``max_height``), with its caption below."""
        pixels = mpimg.imread(png)
        height = WIDTH * pixels.shape[0] / pixels.shape[1]
        width = WIDTH
        if height > max_height:
            width, height = width * max_height / height, max_height
        caption_lines = len(textwrap.wrap(caption, int(WIDTH * 72 / (8.5 * CHAR_WIDTH[False])))) + 1
        extra = caption_lines * 8.5 / 72 * 1.35 + 0.2
        room = PAGE[1] - MARGIN - self.y - extra
        if self.fig is not None and 0.75 * height <= room < height:  # shrink a little rather than leave a gap
            width, height = width * room / height, room
        self._room(height + extra)
        left = MARGIN + (WIDTH - width) / 2
        ax = self.fig.add_axes([left / PAGE[0], 1 - (self.y + height) / PAGE[1], width / PAGE[0], height / PAGE[1]])
        ax.imshow(pixels, interpolation="antialiased")
        ax.axis("off")
        self.y += height + 0.1
        self.paragraph(caption, size=8.5)

    def close(self) -> int:
        self._flush()
        self.pdf.close()
        return self.pages
