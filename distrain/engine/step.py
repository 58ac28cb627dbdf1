"""The end of an optimizer update, after the last micro-batch's backward, under DDP or DeepSpeed."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from distrain.errors import NonFiniteStop


def finish_update(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None,
    check_finite: bool,
) -> tuple[torch.Tensor, bool]:
    """Clip, measure and apply the update whose gradients are complete; return (grad norm, applied).

    Under DDP the gradients are all-reduced, so every rank measures the same norm and skips a
    non-finite update alike. DeepSpeed clips and steps inside ``accelerator.backward`` (its
    ``engine.step``), so the norm comes from the engine afterwards.

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
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)  # inf: measure, don't clip
    applied = not check_finite or bool(torch.isfinite(norm))
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied
