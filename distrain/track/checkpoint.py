"""Checkpoints: Accelerate's full training state plus distrain's own position, written atomically.

Layout under the run dir::

    checkpoints/update-00001234/      model.safetensors, optimizer.bin, random_states_<rank>.pkl
                                      (Accelerate), trainer_state.json (distrain)
    checkpoints/update-00001234.tmp/  a save in progress; never read

A checkpoint directory only gets its final name once every rank has written its part, so a crash
during a save (even kill -9) leaves the previous checkpoint as the newest complete one; the next
save removes the leftover ``.tmp``. Checkpoints are always taken between optimizer updates, so
the gradient-accumulation phase of a checkpoint is always 0. Loading goes through Accelerate,
which reads tensors with safetensors and everything else with ``torch.load(weights_only=True)``:
a checkpoint file cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from distrain.errors import DistrainError

STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^update-(\d{8})$")


@dataclass
class TrainerState:
    """Where training is: what a resumed run needs besides model, optimizer and RNG states.

    Every rank consumes the same number of micro-batches per epoch, and each worker's stream
    position follows from it (see :mod:`distrain.data.stream`), so ``batch_in_epoch`` is the
    position of every rank's and every worker's stream.

    Attributes:
        update: Optimizer updates done (skipped non-finite updates included).
        epoch: Current epoch (0-based).
        batch_in_epoch: Micro-batches of ``epoch`` each rank has consumed.
        samples_seen: Training samples consumed over all ranks.
        bad_samples: Bad training samples replaced so far (all ranks).
        skipped_updates: Updates skipped for a non-finite loss or gradient norm.
        eval: The eval metrics at this point, if an evaluation ran at it.
        ema_updates: EMA updates made (the EMA weights are ``ema.safetensors``).
        config: The resolved config the run was started with.
        plan: The batch plan the run was started with.
    """

    update: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    bad_samples: int = 0
    skipped_updates: int = 0
    eval: dict = field(default_factory=dict)
    ema_updates: int = 0
    config: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)


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


def best_checkpoint(run_dir: str | Path, metric: str = "eval/top1") -> Path | None:
    """The complete checkpoint with the highest ``metric`` (the latest of equals), if any has it."""
    scored = []
    for path in checkpoint_dirs(run_dir):
        value = load_trainer_state(path).eval.get(metric)
        if value is not None:
            scored.append((value, path.name, path))
    return max(scored)[2] if scored else None


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    state: TrainerState,
    keep_last: int,
    keep_best: bool,
    extras: dict[str, dict[str, torch.Tensor]] | None = None,
    per_rank: bool = False,
) -> Path:
    """Save the full training state; every rank must call this at the same point.

    Keeps the newest ``keep_last`` checkpoints, plus the best by ``eval/top1`` if ``keep_best``.
    ``extras`` are further tensor sets (e.g. the EMA weights), written by rank 0 as
    ``<name>.safetensors`` when they are replicated, or by every rank as
    ``<name>-rank<R>.safetensors`` when ``per_rank`` (each rank's ZeRO-3 slice); their counters
    belong in ``state``.

    Returns:
        The checkpoint directory.
    """
    root = run_dir / "checkpoints"
    final = root / f"update-{state.update:08d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if per_rank or accelerator.is_main_process:
        for name, tensors in (extras or {}).items():
            path = tmp / _extra_name(name, accelerator.process_index if per_rank else None)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        best = best_checkpoint(run_dir) if keep_best else None
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _extra_name(name: str, rank: int | None) -> str:
    return f"{name}.safetensors" if rank is None else f"{name}-rank{rank}.safetensors"


def load_extra(checkpoint: Path, name: str, device: torch.device, rank: int | None = None) -> dict[str, torch.Tensor]:
    """A tensor set saved with :func:`save_checkpoint`'s ``extras`` (``rank``: the per-rank set of that rank).

    Raises:
        DistrainError: the checkpoint has no such set (e.g. EMA switched on after it was made).
    """
    path = checkpoint / _extra_name(name, rank)
    if not path.is_file():
        raise DistrainError(f"--resume {checkpoint}: no {path.name} in the checkpoint (was {name} off when it was made?)")
    return {k: v.to(device) for k, v in load_file(path).items()}


def load_trainer_state(checkpoint: Path) -> TrainerState:
    """Read distrain's part of a checkpoint."""
    return TrainerState(**json.loads((checkpoint / STATE_NAME).read_text()))


# What a resumed run must share with its checkpoint to continue exactly: the model and the whole
# batch maths (plan fields), which fix the data each rank reads and the LR of every update.
_MODEL_KEYS = (("model", "name"), ("model", "norm"), ("seed",))
_PLAN_KEYS = ("world_size", "per_device", "accumulation", "global_batch", "train_samples", "updates_per_epoch",
              "total_updates", "warmup_updates", "peak_lr", "warmup_start_lr", "milestone_updates")


def resume_differences(saved: TrainerState, config: dict, plan: dict) -> list[str]:
    """``key: saved -> now`` for each model or batch-maths setting that differs from the checkpoint's."""
    diffs = []
    for path in _MODEL_KEYS:
        old, new = saved.config, config
        for part in path:
            old, new = (old or {}).get(part), (new or {}).get(part)
        if old != new:
            diffs.append(f"{'.'.join(path)}: {old!r} -> {new!r}")
    for key in _PLAN_KEYS:
        old, new = saved.plan.get(key), plan.get(key)
        if isinstance(new, tuple):
            new = list(new)
        if old != new:
            diffs.append(f"plan {key}: {old!r} -> {new!r}")
    return diffs


def rescale_position(saved: TrainerState, plan: dict) -> int:
    """The micro-batch of the saved epoch to restart at under a different batch plan.

    Counts the samples the saved run consumed in its epoch and starts at the next whole update
    of the new plan; the stream order differs, so this resume is approximate (allowed by flag).
    """
    done = saved.batch_in_epoch * saved.plan["per_device"] * saved.plan["world_size"]
    updates = done // plan["global_batch"]
    return min(updates, plan["updates_per_epoch"] - 1) * plan["accumulation"]
