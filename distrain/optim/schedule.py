"""The learning rate as a pure function of the optimizer-update count.

No scheduler object steps alongside the optimizer: the loop asks :func:`lr_at` for the LR of the
update it is about to make, so accumulation, restarts and world-size changes cannot make warmup or
decay drift from the plan.
"""

from __future__ import annotations

import bisect
import math

from distrain.config import ScheduleConfig
from distrain.plan import BatchPlan


def lr_at(update: int, plan: BatchPlan, schedule: ScheduleConfig) -> float:
    """LR for the optimizer update with 0-based index ``update``.

    Linear warmup from ``plan.warmup_start_lr`` reaching ``plan.peak_lr`` at update
    ``plan.warmup_updates``; then cosine or polynomial (to ``peak * final_lr_factor`` at
    ``total_updates``), multistep (``gamma`` at each milestone) or constant.
    """
    peak = plan.peak_lr
    if update < plan.warmup_updates:
        start = plan.warmup_start_lr
        return start + (peak - start) * update / plan.warmup_updates
    if schedule.decay == "multistep":
        return peak * schedule.gamma ** bisect.bisect_right(plan.milestone_updates, update)
    if schedule.decay == "constant":
        return peak
    t = min(1.0, (update - plan.warmup_updates) / max(1, plan.total_updates - plan.warmup_updates))
    final = peak * schedule.final_lr_factor
    if schedule.decay == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    return final + (peak - final) * (1.0 - t) ** schedule.power
