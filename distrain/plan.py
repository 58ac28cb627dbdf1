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


def make_plan(cfg: Config, world_size: int, train_samples: int) -> BatchPlan:
    """Resolve the batch maths of ``cfg`` on ``world_size`` processes for a training set size.

    Raises:
        DistrainError: the global batch is larger than the training set.
    """
    global_batch = cfg.batch.per_device * cfg.batch.accumulation * world_size
    updates_per_epoch = train_samples // global_batch
    if updates_per_epoch == 0:
        raise DistrainError(
            f"batch.per_device x batch.accumulation x {world_size} processes = global batch {global_batch} "
            f"is larger than the {train_samples} training samples"
        )
    repeat_layout(cfg.data.repeats, world_size, cfg.batch.per_device)
    s = cfg.schedule
    peak = scale_lr(cfg.optim.lr, global_batch, cfg.optim.base_batch, cfg.optim.scaling)
    return BatchPlan(
        world_size=world_size,
        per_device=cfg.batch.per_device,
        accumulation=cfg.batch.accumulation,
        global_batch=global_batch,
        train_samples=train_samples,
        updates_per_epoch=updates_per_epoch,
        micro_batches_per_epoch=updates_per_epoch * cfg.batch.accumulation,
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
