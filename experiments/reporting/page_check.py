"""Does any page of the report put ink into its side margins? Text, tables or code that overflow the text
column show there, so this is the automated half of "no overflowing text or tables" (the other half is
looking at the pages: ``pages_png`` writes them).

The pages are rendered by Typst itself from the same ``report.typ`` as the PDF (no PDF renderer needed);
a pixel darker than ``INK`` in the strip between the paper's edge and the text column (less a small
tolerance for anti-aliasing) counts as overflow.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

INK = 200              # grey level (0 black, 255 white) below which a pixel is ink
TOLERANCE_CM = 0.1     # anti-aliased glyph edges may touch the text column's border by this much


def render_pages(source: Path, root: Path, ppi: float) -> list[bytes]:
    """The pages of a Typst source as PNG bytes, one per page."""
    import typst

    pages = typst.compile(str(source), root=str(root), format="png", ppi=ppi)
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


def pages_png(source: Path, root: Path, out: Path, ppi: float = 110) -> list[Path]:
    """Write ``page-<n>.png`` for every page into ``out`` (to look at the layout)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, png in enumerate(render_pages(source, root, ppi), 1):
        path = out / f"page-{number:02d}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths
