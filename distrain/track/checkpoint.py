"""Checkpoints: Accelerate's full training state plus distrain's own position, written atomically.

Layout under the run dir::

    checkpoints/update-00001234/      model.safetensors, optimizer.bin, random_states_<rank>.pkl
                                      (Accelerate), trainer_state.json (distrain)
    checkpoints/update-00001234.tmp/  a save in progress; never read

A checkpoint directory only gets its final name once every rank has written its part, so a crash
during a save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

from distrain.errors import DistrainError

STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^update-(\d{8})$")


@dataclass
class TrainerState:
    """Where training is: what a resumed run needs besides model, optimizer and RNG states.

    Attributes:
        update: Optimizer updates done.
        epoch: Current epoch (0-based).
        batch_in_epoch: Micro-batches of ``epoch`` this rank has consumed.
        config: The resolved config the run was started with.
    """

    update: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    config: dict = field(default_factory=dict)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` is the newest in ``run_dir`` (or none), else a path.

    Raises:
        DistrainError: an explicit path that is not a complete checkpoint.
    """
    if resume == "auto":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and not (path / STATE_NAME).is_file():
        found = checkpoint_dirs(path)
        if found:
            return found[-1]
    if not (path / STATE_NAME).is_file():
        raise DistrainError(f"--resume {resume}: not a complete distrain checkpoint (no {STATE_NAME})")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep_last: int) -> Path:
    """Save the full training state; every rank must call this at the same point.

    Returns:
        The checkpoint directory.
    """
    root = run_dir / "checkpoints"
    final = root / f"update-{state.update:08d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> TrainerState:
    """Read distrain's part of a checkpoint."""
    return TrainerState(**json.loads((checkpoint / STATE_NAME).read_text()))
