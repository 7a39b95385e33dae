"""Ctrl-C at an entry point: one line saying what was kept and how to go on, and exit status 130 (128 + SIGINT,
what a shell reports for an interrupted command), instead of a KeyboardInterrupt traceback through torch.

Imports nothing heavy, so an entry point can wrap its main before torch or Hydra is loaded.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C carrying the entry point's own account of what was kept (raised where that is known)."""


def exit_on_interrupt(kept: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap an entry point's main: a KeyboardInterrupt ends it with ``interrupted: <what was kept>`` on stderr
    and status 130; ``kept`` is said unless the interrupt is an ``Interrupted`` that knows better."""

    def wrap(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt as interrupt:
                said = str(interrupt) if isinstance(interrupt, Interrupted) and str(interrupt) else kept
                print(f"interrupted: {said}", file=sys.stderr, flush=True)
                raise SystemExit(EXIT_INTERRUPTED) from None

        return wrapped

    return wrap
