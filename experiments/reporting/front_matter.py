"""The paper's front matter settings: ``report.title``, ``report.authors``, ``report.affiliation``, declared and
validated here (experiments/report.py's options and the study YAML's ``report:`` node both come through it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FrontMatter:
    """The paper's title, authors and affiliation (``report.*``): given on the command line (experiments/report.py
    --title/--authors/--affiliation), else in the study's YAML under ``report:``, else these defaults (the title
    from what the runs compare)."""

    title: str | None = None
    authors: str = "The PatchCore suite authors"
    affiliation: str = ""

    @classmethod
    def of(cls, manifest: dict | None, **given: str | None) -> FrontMatter:
        """The settings: ``given`` (None: not given) over the study's ``report:`` node over the defaults; a value
        that is not text is refused, naming the study and the key."""
        node = ((manifest or {}).get("config") or {}).get("report") or {}
        source = (manifest or {}).get("source", "the study config")
        if not isinstance(node, dict):
            raise ValueError(f"{source}: report: must be a mapping with title, authors, affiliation (got {node!r})")
        unknown = set(node) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{source}: report.{sorted(unknown)[0]} is not a setting: use report.title, "
                             "report.authors or report.affiliation")
        values = {}
        for key in cls.__dataclass_fields__:
            value = given.get(key) if given.get(key) is not None else node.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{source}: report.{key}={value!r} must be text (quote it in the YAML)")
            if value is not None:
                values[key] = value
        return cls(**values)

    def byline(self) -> str:
        return ", ".join(filter(None, [self.authors, self.affiliation]))
