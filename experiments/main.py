"""Fit a detector on each requested category and evaluate it: ``python experiments/main.py [overrides]``.

The work is experiments/harness/fit_and_evaluate.py's; this entry point only refuses old setting names
first, so that mistake costs no torch import, and puts a selection's chosen overrides (``selection=<path to
selection.json>``, written by experiments/selection.py) on the command line before Hydra composes.
"""

from __future__ import annotations

import sys

from experiments.harness.interrupts import exit_on_interrupt
from experiments.harness.overrides import refuse_bad_overrides
from experiments.harness.selection_file import apply_selection


@exit_on_interrupt("nothing was written yet; run the same command again")
def main() -> None:
    """Old setting names and model-mixing sweeps are refused before anything heavy is imported (in well
    under a second); then the Hydra task runs (experiments/harness/fit_and_evaluate.py)."""
    refuse_bad_overrides(sys.argv[1:])
    try:  # selection=<selection.json>: its chosen overrides, as if typed (experiments/harness/selection_file.py)
        sys.argv[1:] = apply_selection(sys.argv[1:])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    from experiments.harness.fit_and_evaluate import hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
