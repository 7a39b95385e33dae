"""The report, one pipeline: runs -> comparisons (comparisons.py, with the variant labels; discovery and tidy
rows in data.py) -> one document model (document.py) holding the paper (paper.py, paper_sections.py) or the run
digest (digest.py), with tables (tables.py), statistics (stats.py) and figures (figures.py) -> renderers
(typst_out.py, html_out.py, markdown_out.py). The command line is ``experiments/report.py``."""
