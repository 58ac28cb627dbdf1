"""The rank-0 progress bar over optimizer updates."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar counting optimizer updates, with loss, LR and images/s in its postfix.

    On a non-interactive stream (CI, SLURM logs) it redraws every 30 s instead of every 0.1 s.
    """

    def __init__(self, total: int, done: int, enabled: bool, unit: str = "upd"):
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=done,
            disable=not enabled,
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
        """Print a line above the bar."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
