"""Tables, figures and a PDF from the logged runs: ``python experiments/report.py [RUN_DIR ...]``.

Reads every ``results.json`` below the given folders (default ``outputs/`` and ``multirun/``) and writes
into ``reports/`` (``--out``)::

    tables/<metric>.{csv,md,tex}   category x variant, mean row, best per row in bold (CSV: the numbers, in %)
    tables/timing.{csv,md,tex}     fit time, throughput, bank size, peak memory per variant
    tables/runs.csv                one row per (run, category): settings, metrics, timings, run folder
    tables/excluded.csv            runs left out (incomplete, another dataset, duplicates) and why
    figures/*.{png,pdf}            coreset ratio, layer heatmap, cold start, ROC curves, anomaly-map grids
    report.md, report.pdf          all of it with the setup and the commands that reproduce each number
    report.json                    what was written (pages, tables, figures, runs)

Runs are grouped into variants (backbone + settings that differ from its defaults, see
experiments/reporting/variants.py); seeds of one variant are averaged (mean ± std). The library code is the
``experiments.reporting`` package; this file only parses the command line and prints what was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.reporting.build import build_report
from experiments.runs.run_key import DEFAULT_ROOTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", help="folders searched for results.json (default: outputs multirun)")
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--dataset", default=None, help="report on this dataset (default: the one most runs used)")
    args = parser.parse_args(argv)
    run_dirs = args.run_dirs or [d for d in DEFAULT_ROOTS if Path(d).is_dir()] or list(DEFAULT_ROOTS)
    manifest = build_report(run_dirs, args.out, args.dataset)
    out = Path(args.out)
    print(f"{len(manifest['runs'])} runs on {manifest['dataset']}, {len(manifest['excluded'])} left out; "
          f"{len(manifest['tables'])} tables in {out / 'tables'}, {len(manifest['figures'])} figures in "
          f"{out / 'figures'}; {out / 'report.pdf'} ({manifest['pages']} pages), {out / 'report.md'}")
    for row in manifest["excluded"]:
        print(f"  left out: {row['run_dir']}: {row['reason']}")


if __name__ == "__main__":
    main()
