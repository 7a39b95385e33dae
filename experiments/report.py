"""The paper and the run digest from the logged runs: ``python experiments/report.py [RUN_DIR ...]``.

Reads every ``results.json`` below the given folders (default: the newest study under ``studies/``, made by
``make study``; without one, ``outputs/`` and ``multirun/``) and writes into ``reports/`` (``--out``)::

    report.pdf, report.html        the paper (Typst; the HTML from the same document model): introduction,
                                   related work, method, setup, results per comparison, discussion,
                                   limitations, conclusion, reproducibility appendix (experiments/reporting/paper.py)
    report.typ, references.yml     its Typst source (recompile with `typst compile report.typ`)
    tables/paper_*.{csv,md,tex}    the paper's tables (CSV: the numbers, *_std.csv: the sample stds over seeds;
                                   LaTeX: booktabs)
    tables/sources.csv, paper.json the results.json files behind every number
    tables/<metric>.{csv,md,tex}   the digest: category x variant, mean row, best per row in bold
    tables/timing.{csv,md,tex}     fit time, throughput, bank size, peak memory per variant
    tables/runs.csv, excluded.csv  one row per (run, category); runs left out and why
    figures/*.{png,pdf}            the figures of both
    digest.md, digest.json         the run digest: setup, every table and figure, one command per variant
    digest.pdf, digest.typ         the same document typeset by Typst (not with --no-digest-pdf)

Both documents come from one pipeline: runs -> comparisons -> one document model -> Typst / HTML / Markdown
(experiments/reporting). The text of the paper lives in reports/paper/*.md; every number in it is filled
from the runs. Every table cell is a mean ± sample std (ddof=1) over seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.harness.run_key import DEFAULT_ROOTS
from experiments.reporting.claims import ClaimError
from experiments.reporting.comparisons import load
from experiments.reporting.digest import build_digest
from experiments.reporting.front_matter import FrontMatter
from experiments.reporting.paper import WRITTEN, build_paper
from experiments.reporting.replication import BenchFileError

STUDIES = Path("studies")


def default_run_dirs() -> list[str]:
    """The newest study (by its manifest's time), else outputs/ and multirun/."""
    manifests = sorted(STUDIES.glob("*/study.json"), key=lambda p: p.stat().st_mtime)
    if manifests:
        return [str(manifests[-1].parent)]
    return [d for d in DEFAULT_ROOTS if Path(d).is_dir()] or list(DEFAULT_ROOTS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", help="folders searched for results.json (default: the newest study, "
                                                    "else outputs multirun)")
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--dataset", default=None, help="report on this dataset (default: the one most runs used)")
    parser.add_argument("--no-digest-pdf", action="store_true", help="write the digest as Markdown only")
    parser.add_argument("--mark-failed-claims", action="store_true",
                        help="render a claim of the written text that the runs do not support visibly marked, "
                             "instead of failing (reports/paper/written/<study>/, docs/experiments.md)")
    parser.add_argument("--written", default=None,
                        help="folder of the studies' written text (default: reports/paper/written)")
    parser.add_argument("--bench", default=None,
                        help="make bench's results.jsonl (e.g. outputs/bench/results.jsonl): the replication "
                             "section prints its speed ratios against the official-style and anomalib-style pipelines")
    parser.add_argument("--no-gallery", action="store_true",
                        help="leave the HTML's anomaly-map gallery out (its PNGs are copied next to the report: "
                             "tens of MB for a study; reports/reference/ is built this way)")
    for key, default in (("title", "from what the runs compare"), ("authors", FrontMatter.authors),
                         ("affiliation", "none")):
        parser.add_argument(f"--{key}", default=None, help=f"the paper's {key} (else the study YAML's report.{key}, "
                                                           f"else: {default})")
    args = parser.parse_args(argv)
    run_dirs = args.run_dirs or default_run_dirs()
    out = Path(args.out)
    inputs = load(run_dirs, args.dataset)  # read once, for both documents
    written = Path(args.written) if args.written else WRITTEN
    bench = Path(args.bench) if args.bench else None
    try:  # the settings are checked before any document is written
        front = FrontMatter.of(inputs.manifest, title=args.title, authors=args.authors, affiliation=args.affiliation)
    except ValueError as error:
        parser.error(str(error))
    try:  # the paper first: a claim the runs no longer support stops the build before anything is written
        paper = build_paper(run_dirs, out, inputs=inputs, front=front, written=written,
                            mark_claims=args.mark_failed_claims, bench=bench, gallery=not args.no_gallery)
    except (ClaimError, BenchFileError) as error:  # raised before anything is written
        raise SystemExit(f"error: {error}") from None
    digest = build_digest(run_dirs, out, inputs=inputs, pdf=not args.no_digest_pdf)
    print(f"{len(digest['runs'])} runs on {digest['dataset']}, {len(digest['excluded'])} left out")
    print(f"paper: {out / 'report.pdf'}, {out / 'report.html'} ({len(paper['comparisons'])} comparisons, "
          f"{len(paper['tables'])} tables, {len(paper['figures'])} figures)")
    if paper["pages_overflowing"]:
        print(f"warning: content runs into the side margins on pages {paper['pages_overflowing']} of "
              f"{out / 'report.pdf'} (a table or code line too wide): look at them, e.g. typst compile "
              f"{out / 'report.typ'} 'page-{{p}}.png'")
    pdf = "" if args.no_digest_pdf else f"{out / 'digest.pdf'} ({digest['pages']} pages), "
    print(f"digest: {pdf}{out / 'digest.md'}; tables in {out / 'tables'}")
    if digest["pages_overflowing"]:
        print(f"warning: content runs into the side margins on pages {digest['pages_overflowing']} of "
              f"{out / 'digest.pdf'}")
    for row in digest["excluded"]:
        print(f"  left out: {row['run_dir']}: {row['reason']}")


if __name__ == "__main__":
    main()
