"""The experiment report: discovery and tidy rows (data), variant labels (variants), tables, figures,
the generated sections (sections, blocks), the PDF typesetter (pdf) and ``build_report`` (build).
The command line is ``experiments/report.py``."""
