"""One micro-batch and the end of an optimizer update, under DDP or DeepSpeed.

The loop and ``distrain bench step`` both call these, so the bench times the loop's own code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from distrain.errors import NonFiniteStop
from distrain.tricks.transfer import drop_frozen_grads, group_lr


def micro_batch(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
    images: torch.Tensor, targets: torch.Tensor, next_lr: Callable[[], float], poison: bool = False,
    epoch: float = 0.0,
) -> tuple[torch.Tensor, float | None]:
    """Forward, loss and backward of one micro-batch; call it inside ``accelerator.accumulate(model)``.

    ``loss_fn(model, images, targets)`` is the phase objective's loss.

    On the last micro-batch of an update it first sets that update's LR (``next_lr()``), because
    DeepSpeed steps inside ``backward``.

    Args:
        poison: Make the loss NaN (fault drills and tests).
        epoch: Where the update is, in epochs: each parameter group's LR is the scheduled one times
            its layer-decay scale, or 0 while it is frozen (:func:`~distrain.tricks.transfer.group_lr`).

    Returns:
        The loss (detached, still on the device: no host sync) and the scheduled LR it set, or None.
    """
    loss = loss_fn(model, images, targets)
    if poison:
        loss = loss * float("nan")
    lr = None
    if accelerator.sync_gradients:
        lr = next_lr()
        for group in optimizer.param_groups:
            group["lr"] = group_lr(group, lr, epoch)
    accelerator.backward(loss)
    return loss.detach(), lr


def finish_update(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None,
    check_finite: bool, epoch: float = 0.0,
) -> tuple[torch.Tensor, bool]:
    """Clip, measure and apply the update whose gradients are complete; return (grad norm, applied).

    Under DDP the gradients are all-reduced, so every rank measures the same norm and skips a
    non-finite update alike. DeepSpeed clips and steps inside ``accelerator.backward`` (its
    ``engine.step``), so the norm comes from the engine afterwards.

    On CUDA, reading whether the norm is finite is the one host synchronisation of the update: the
    host waits here for the backward pass, so it never gets more than one update ahead of the GPU.
    (Under fp16, where the check is off, the GradScaler's step waits alike; DeepSpeed reads its
    norm.)

    Raises:
        NonFiniteStop: under DeepSpeed, a non-finite norm (the update is already applied, so it
            cannot be skipped: the newest checkpoint holds the last good state).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        norm = model.get_global_grad_norm()
        norm = torch.tensor(math.nan if norm is None else float(norm))
        if check_finite and not torch.isfinite(norm):
            raise NonFiniteStop(
                f"rank {accelerator.process_index}: non-finite gradient norm under DeepSpeed, which applies an "
                "update before its norm is known; continue from the newest checkpoint with --resume auto"
            )
        return norm, True
    drop_frozen_grads(optimizer, epoch)  # frozen blocks: no step, no momentum, not in the norm
    if max_norm:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    else:
        # Measure only: clip_grad_norm_ with an infinite bound would also rescale every gradient by 1.
        accelerator.unscale_gradients()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    applied = not check_finite or bool(torch.isfinite(norm))
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied
