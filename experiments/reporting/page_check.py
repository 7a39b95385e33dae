"""Does any page of the report put ink into its side margins? Text, tables or code that overflow the text
column show there, so this is the automated half of "no overflowing text or tables" (the other half is
looking at the pages: ``typst compile reports/report.typ 'page-{p}.png'``).

The pages are rendered by Typst itself, by the same compiler that wrote the PDF (no PDF renderer needed);
a pixel darker than ``INK`` in the strip between the paper's edge and the text column (less a small
tolerance for anti-aliasing) counts as overflow.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

INK = 200              # grey level (0 black, 255 white) below which a pixel is ink
TOLERANCE_CM = 0.1     # anti-aliased glyph edges may touch the text column's border by this much


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
