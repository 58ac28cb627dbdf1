"""The rank-0 progress bar over optimizer updates."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar counting optimizer updates, with loss, LR and images/s in its postfix.

    On a non-interactive stream (CI, SLURM logs) it redraws every 30 s instead of every 0.1 s.

    Args:
        total: Updates of the whole run.
        done: Updates already done (a resumed run starts its bar there).
        main: Whether this rank prints: only one rank of a job should, or a 256-rank job repeats
            every line 256 times.
        bar: Whether the main rank also draws the bar (``logging.progress``); its lines print anyway.
        unit: The bar's unit.
    """

    def __init__(self, total: int, done: int, main: bool, bar: bool = True, unit: str = "upd"):
        interactive = sys.stderr.isatty()
        self.main = main
        self.bar = tqdm(
            total=total,
            initial=done,
            disable=not (main and bar),
            unit=unit,
            dynamic_ncols=True,
            mininterval=0.1 if interactive else 30.0,
            file=sys.stderr,
        )

    def update(self, n: int = 1, **postfix: str) -> None:
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def write(self, line: str) -> None:
        """Print a line above the bar, on the main rank only."""
        if self.main:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
