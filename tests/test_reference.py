"""The committed reference study (reports/reference/): the README's main result quotes its paper's written
conclusion as the build printed it (numbers filled from the runs, every claim checked), so the README cannot
drift from the paper; the copy stays small and holds what its README lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reports" / "reference"


def _words(text: str) -> str:
    return " ".join(text.split())


def _main_result() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("#### Main result")
    return _words(readme[start:readme.index("\n## ", start)])


def test_the_readme_quotes_the_reference_papers_conclusion() -> None:
    record = json.loads((REFERENCE / "paper.json").read_text())
    assert record["study"] == "default" and all(claim["holds"] for claim in record["claims"])
    conclusion = record["written"]["conclusion"]
    paragraphs = [_words(p) for p in conclusion.split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
    assert paragraphs
    quoted = _main_result()
    for paragraph in paragraphs:
        assert paragraph in quoted, f"the README's main result does not quote: {paragraph[:80]}..."


def test_the_reference_copy_is_small_and_whole() -> None:
    files = [p for p in REFERENCE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    for name in ("default_study.pdf", "default_study.html", "paper.json", "default_study.json", "README.md"):
        assert (REFERENCE / name).is_file(), name
    html = (REFERENCE / "default_study.html").read_text()
    for source in re.findall(r'<img[^>]* src="([^"]+)"', html):
        assert source.startswith("data:") or (REFERENCE / source).is_file(), source
    written = {p.stem for p in (REFERENCE / "written").glob("*.md")}
    assert written == {p.stem for p in (ROOT / "reports" / "paper" / "written" / "default").glob("*.md")}
