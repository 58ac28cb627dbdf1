"""Checkpoints: Accelerate's full training state plus distrain's own position, written atomically.

Layout under the run dir::

    checkpoints/update-00001234/      model.safetensors, optimizer.bin, random_states_<rank>.pkl
                                      (Accelerate), trainer_state.json (distrain); under DeepSpeed
                                      pytorch_model/ (each rank's ZeRO partitions) instead of the
                                      model and optimizer files
    checkpoints/update-00001234.tmp/  a save in progress; never read

A checkpoint directory only gets its final name once every rank has written its part, so a crash
during a save (even kill -9) leaves the previous checkpoint as the newest complete one; the next
save removes the leftover ``.tmp``. Checkpoints are always taken between optimizer updates, so
the gradient-accumulation phase of a checkpoint is always 0. Loading goes through Accelerate
(and, under ZeRO, DeepSpeed's loader, which calls ``torch.load(weights_only=False)``), always inside
:func:`distrain.track.safeload.refusing_pickled_code`: every ``torch.load`` then reads tensors and
the few allowlisted types only, so a checkpoint file cannot run code; one that tries is refused with
a one-line error naming it. Model and EMA weights are safetensors.
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

from distrain.config import Config, to_dict
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
        early_stopping: The early-stopping counters (best value, evaluations since), so that a
            resumed run does not restart its patience.
        teacher_sha256: The distillation teacher's weights (their sha256): a resume with other
            weights at the same path is refused like any changed setting.
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
    early_stopping: dict = field(default_factory=dict)
    teacher_sha256: str = ""
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


def best_checkpoint(run_dir: str | Path, metric: str = "eval/top1", mode: str = "max",
                    best_update: int | None = None) -> Path | None:
    """The best complete checkpoint: the one taken at ``best_update`` (early stopping's best) if it
    exists, else the one with the highest ``metric`` (lowest under ``mode`` ``min``; the latest of
    equals), if any has it."""
    if best_update is not None and (checkpoint_at(run_dir, best_update) / STATE_NAME).is_file():
        return checkpoint_at(run_dir, best_update)
    scored = []
    for path in checkpoint_dirs(run_dir):
        value = load_trainer_state(path).eval.get(metric)
        if value is not None:
            scored.append((value if mode == "max" else -value, path.name, path))
    return max(scored)[2] if scored else None


def checkpoint_at(run_dir: str | Path, update: int) -> Path:
    """Where the checkpoint taken after ``update`` updates is (or would be)."""
    return Path(run_dir) / "checkpoints" / f"update-{update:08d}"


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    state: TrainerState,
    keep_last: int,
    keep_best: bool,
    extras: dict[str, dict[str, torch.Tensor]] | None = None,
    per_rank: bool = False,
    best: tuple[str, str, int | None] = ("eval/top1", "max", None),
) -> Path:
    """Save the full training state; every rank must call this at the same point.

    Keeps the newest ``keep_last`` checkpoints, plus, if ``keep_best``, the best by ``best`` (metric,
    mode, early stopping's best update: see :func:`best_checkpoint`).
    ``extras`` are further tensor sets (e.g. the EMA weights), written by rank 0 as
    ``<name>.safetensors`` when they are replicated, or by every rank as
    ``<name>-rank<R>.safetensors`` when ``per_rank`` (each rank's ZeRO-3 slice); their counters
    belong in ``state``.

    Returns:
        The checkpoint directory.
    """
    root = run_dir / "checkpoints"
    final = checkpoint_at(run_dir, state.update)
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
        kept = best_checkpoint(run_dir, *best) if keep_best else None
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            if old != kept:
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


# What a resumed run must share with its checkpoint to continue exactly: every config key, unless
# listed below, and the whole batch maths (plan fields), which fix the data each rank reads and the
# LR of every update. Deny by default: a key added to the config later is compared until someone
# decides it may change freely and adds it here with the reason. "section.*" frees a whole section.
RESUME_FREE = (
    "name",  # a label (W&B run name); the checkpoint is found through run_dir or --resume
    "run_dir",  # where the outputs go: a run may be moved and resumed from its new place
    "deterministic",  # which kernels run (cuDNN autotuning, deterministic algorithms), not what they compute
    "data.prepare",  # writes built-in shards only when data.train is missing; the shards are compared as data.train
    "data.train_samples",  # only `distrain plan` without data reads it; training counts the shard index (plan)
    # Evaluation only. The FixRes phase trains at eval_resize/eval_crop, but its checkpoints hold
    # them as its own data.train_resize/data.train_crop, which are compared.
    "data.eval",
    "data.eval_resize",
    "data.eval_crop",
    "data.prefetch",  # how far ahead the workers decode, not what
    "data.bad_samples",  # what happens at a bad sample (skip or stop), not what a good one holds
    "data.max_bad_fraction",  # likewise
    "model.zero_init_residual",  # the initial weights only, which the checkpoint's replace
    "model.init",  # likewise
    "model.init_gain",  # likewise
    "model.pretrained",  # likewise (a phase's start is the previous phase's export)
    "model.pretrained_ignore",  # likewise
    "model.reset_classifier",  # likewise
    "model.channels_last",  # memory layout: the same maths up to kernel rounding
    "model.compile",  # likewise
    "batch.per_device",  # batch.*: the plan's per-device batch, accumulation and world size are
    "batch.accumulation",  # compared instead: with batch.global_batch set, a different cap that
    "batch.global_batch",  # resolves to the same plan is an exact resume
    "train.log_every",  # logging cadence
    "train.max_updates",  # where this invocation stops; the schedule (LR) is unchanged
    "train.nonfinite",  # what happens at a non-finite update, not the finite ones
    "train.max_consecutive_skips",  # likewise
    "ema.export",  # which weights are written at the end, not how they are averaged
    "fixres.epochs",  # the phase after the main schedule: its checkpoints hold these as
    "fixres.lr",  # schedule.epochs and optim.lr, which are compared there
    "distributed.timeout_s",  # how long to wait for a lost peer
    "eval.*",  # evaluation cadence and batch: evaluation reads no training sample, changes no training state
    "checkpoint.*",  # checkpoint cadence and retention
    "logging.*",  # outputs only (W&B, progress bar, audit logs)
    "preemption.*",  # how often ranks agree to stop, and requeueing
    "early_stopping.*",  # when the run ends and what it exports, not what an update computes (like train.max_updates)
    "phases",  # each phase's checkpoints hold that phase's own resolved config, which is compared
)
_PLAN_KEYS = ("world_size", "per_device", "accumulation", "global_batch", "train_samples", "updates_per_epoch",
              "total_updates", "warmup_updates", "peak_lr", "warmup_start_lr", "milestone_updates")


def _is_free(key: str) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in RESUME_FREE)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists are values (compared whole), tuples become lists."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def resume_differences(saved: TrainerState, config: dict, plan: dict) -> list[str]:
    """``key: saved -> now`` for each setting that would make the resumed run differ from an uninterrupted one.

    Every config key is compared except those in :data:`RESUME_FREE`; a key that the checkpoint's
    config lacks (written before the key existed) counts as its default. ``data.workers`` decides
    which samples each DataLoader worker reads within an epoch, so it may change only at an epoch
    boundary (0 and 1 read alike: both are one stream).
    """
    defaults = _flatten(to_dict(Config()))
    old_flat, new_flat = _flatten(saved.config or {}), _flatten(config or {})
    diffs = []
    for key in dict.fromkeys([*defaults, *old_flat, *new_flat]):
        old, new = old_flat.get(key, defaults.get(key)), new_flat.get(key, defaults.get(key))
        if old == new or _is_free(key):
            continue
        if key == "train.precision" and old == "auto":
            continue  # a checkpoint from before runs stored the precision "auto" resolved to
        if key == "data.workers":
            at_boundary = saved.batch_in_epoch in (0, saved.plan.get("micro_batches_per_epoch"))
            if at_boundary or max(old, 1) == max(new, 1):
                continue
            diffs.append(f"{key}: {old!r} -> {new!r} (mid-epoch, at micro-batch {saved.batch_in_epoch} of epoch "
                         f"{saved.epoch}: workers read other samples; it may change at an epoch boundary)")
            continue
        diffs.append(f"{key}: {old!r} -> {new!r}")
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
