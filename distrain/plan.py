"""The one place that does batch maths.

Everything that depends on how many samples make an update — the global batch, the scaled peak
LR, updates per epoch, warmup and decay points in optimizer updates, the samples each rank reads
per epoch — is computed here from the config and the world size, and only read elsewhere.
``distrain plan`` prints this object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from distrain.config import Config
from distrain.data.shards import repeat_layout
from distrain.errors import DistrainError


@dataclass(frozen=True)
class BatchPlan:
    """Batch maths of a run on a given number of processes.

    Attributes:
        world_size: Processes (devices) taking part.
        per_device: Samples per device per micro-batch.
        accumulation: Micro-batches per optimizer update.
        global_batch: Samples per optimizer update over all devices.
        train_samples: Size of the training set.
        updates_per_epoch: Optimizer updates per epoch (the remainder of an epoch is dropped).
        micro_batches_per_epoch: Micro-batches each rank runs per epoch.
        samples_per_epoch: Samples actually trained on per epoch (copies included).
        repeats: Augmented copies of each sample per step (repeated augmentation).
        unique_samples_per_epoch: Distinct samples per epoch (``samples_per_epoch / repeats``).
        epochs: Length of the schedule in epochs.
        total_updates: Length of the schedule in optimizer updates.
        warmup_updates: Updates of linear warmup.
        base_lr: LR at the reference batch ``base_batch``.
        base_batch: Reference batch of ``base_lr``.
        peak_lr: ``base_lr`` scaled to ``global_batch`` by ``scaling``.
        scaling: The LR scaling rule (linear, sqrt or none).
        warmup_start_lr: LR at update 0 when warming up.
        milestone_updates: Updates at which multistep decay applies ``gamma``.
    """

    world_size: int
    per_device: int
    accumulation: int
    global_batch: int
    train_samples: int
    updates_per_epoch: int
    micro_batches_per_epoch: int
    samples_per_epoch: int
    repeats: int
    unique_samples_per_epoch: int
    epochs: int
    total_updates: int
    warmup_updates: int
    base_lr: float
    base_batch: int
    peak_lr: float
    scaling: str
    warmup_start_lr: float
    milestone_updates: tuple[int, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def scale_lr(base_lr: float, global_batch: int, base_batch: int, rule: str) -> float:
    """Peak LR for ``global_batch`` from the LR tuned at ``base_batch``.

    ``linear`` is Goyal et al. 2017 (LR proportional to batch); ``sqrt`` is the square-root rule
    (Krizhevsky 2014, Hoffer et al. 2017), often used with Adam-type optimizers.
    """
    ratio = global_batch / base_batch
    return {"linear": base_lr * ratio, "sqrt": base_lr * math.sqrt(ratio), "none": base_lr}[rule]


def resolve_batch(global_batch: int, max_per_device: int, world_size: int, multiple_of: int = 1) -> tuple[int, int]:
    """Per-device batch and accumulation that make ``global_batch`` on ``world_size`` devices.

    Picks the fewest micro-batches per update (accumulation) whose per-device batch fits in
    ``max_per_device`` and is a multiple of ``multiple_of`` (the ghost batch size).

    Raises:
        DistrainError: no split gives exactly ``global_batch``.
    """
    if global_batch % world_size == 0:
        per_rank = global_batch // world_size
        for accumulation in range(max(1, math.ceil(per_rank / max_per_device)), per_rank + 1):
            per_device, rest = divmod(per_rank, accumulation)
            if not rest and per_device % multiple_of == 0:
                return per_device, accumulation
    ghost = f" in multiples of model.ghost_batch_size {multiple_of}" if multiple_of > 1 else ""
    raise DistrainError(
        f"batch.global_batch: {global_batch} cannot be split into {world_size} processes x equal micro-batches of "
        f"at most batch.per_device={max_per_device}{ghost}"
    )


def make_plan(cfg: Config, world_size: int, train_samples: int) -> BatchPlan:
    """Resolve the batch maths of ``cfg`` on ``world_size`` processes for a training set size.

    Raises:
        DistrainError: the global batch is larger than the training set, or cannot be split.
    """
    per_device, accumulation = cfg.batch.per_device, cfg.batch.accumulation
    if cfg.batch.global_batch:
        ghost = cfg.model.ghost_batch_size or 1
        per_device, accumulation = resolve_batch(cfg.batch.global_batch, per_device, world_size, ghost)
    global_batch = per_device * accumulation * world_size
    updates_per_epoch = train_samples // global_batch
    if updates_per_epoch == 0:
        raise DistrainError(
            f"batch.per_device x batch.accumulation x {world_size} processes = global batch {global_batch} "
            f"is larger than the {train_samples} training samples"
        )
    repeat_layout(cfg.data.repeats, world_size, per_device)
    s = cfg.schedule
    peak = scale_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch, cfg.optim.scaling)
    return BatchPlan(
        world_size=world_size,
        per_device=per_device,
        accumulation=accumulation,
        global_batch=global_batch,
        train_samples=train_samples,
        updates_per_epoch=updates_per_epoch,
        micro_batches_per_epoch=updates_per_epoch * accumulation,
        samples_per_epoch=updates_per_epoch * global_batch,
        repeats=cfg.data.repeats,
        unique_samples_per_epoch=updates_per_epoch * global_batch // cfg.data.repeats,
        epochs=s.epochs,
        total_updates=updates_per_epoch * s.epochs,
        warmup_updates=s.warmup_updates or round(s.warmup_epochs * updates_per_epoch),
        base_lr=cfg.optim.lr,
        base_batch=cfg.optim.base_batch,
        peak_lr=peak,
        scaling=cfg.optim.scaling,
        warmup_start_lr=cfg.optim.lr if s.warmup_start_lr is None else s.warmup_start_lr,
        milestone_updates=tuple(round(m * updates_per_epoch) for m in s.milestones),
    )
