"""``logging.draws``: an audit log of each rank's device-side random draws."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distrain.tricks.mix import MixDraw


class DrawLog:
    """``logging.draws``: each micro-batch's device-side draws, per rank, in ``RUN_DIR/draws/rank<R>.jsonl``.

    An audit trail for what the README promises: ranks draw differently, and a resumed run draws
    what the uninterrupted one would (the sums identify the exact augmented tensors). The sums
    cost two host synchronisations per micro-batch on a GPU: an audit switch, not for long runs.
    """

    def __init__(self, run_dir: Path, rank: int):
        (run_dir / "draws").mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "draws" / f"rank{rank}.jsonl", "a")  # noqa: SIM115 (open for the run)

    def write(self, update: int, micro: int, keys: list[str], images: torch.Tensor, targets: torch.Tensor,
              drawn: dict) -> None:
        mix: MixDraw | None = drawn.get("mix")
        record = {
            "update": update, "micro": micro, "keys": keys, "erased": drawn.get("erased"),
            "mix": None if mix is None else {"kind": mix.kind, "lam": mix.lam, "box": mix.box},
            "images_sum": _checksum(images), "targets_sum": _checksum(targets),
        }
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _checksum(t: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    """A position-weighted float64 sum: equal for equal tensors, different for permuted ones (of
    each part, added, for targets made of several tensors)."""
    if isinstance(t, tuple):
        return sum(_checksum(part) for part in t)
    flat = t.detach().double().flatten()
    return (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum().item()
