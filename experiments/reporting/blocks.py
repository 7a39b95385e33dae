"""The report's text as blocks that write themselves twice: into report.md and onto the PDF pages.

A section is a list of blocks; ``markdown`` and ``render`` turn it into either output, so the two never
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.reporting.pdf import Document


@dataclass(frozen=True)
class Heading:
    text: str

    def markdown(self) -> str:
        return f"## {self.text}\n"

    def render(self, doc: Document) -> None:
        doc.heading(self.text)


@dataclass(frozen=True)
class Text:
    text: str

    def markdown(self) -> str:
        return f"{self.text}\n"

    def render(self, doc: Document) -> None:
        doc.paragraph(self.text)


@dataclass(frozen=True)
class Bullets:
    items: list[str]

    def markdown(self) -> str:
        return "\n".join(f"- {item}" for item in self.items) + "\n"

    def render(self, doc: Document) -> None:
        doc.bullets(self.items)


@dataclass(frozen=True)
class Code:
    text: str

    def markdown(self) -> str:
        return f"```\n{self.text}\n```\n"

    def render(self, doc: Document) -> None:
        doc.paragraph(self.text, size=7, mono=True)


Block = Heading | Text | Bullets | Code


def markdown(blocks: list[Block]) -> str:
    return "\n".join(block.markdown() for block in blocks)


def render(doc: Document, blocks: list[Block]) -> None:
    for block in blocks:
        block.render(doc)
