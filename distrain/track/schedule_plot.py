"""The schedules of a planned run over its optimizer updates: LR, training resolution, EMA decay.

``distrain plan --png`` draws them, so a recipe's warmup, decay points, resolution ramp and FixRes
phase can be checked before any GPU is booked. The values come from the same functions the loop
calls (:func:`~distrain.optim.lr_at`, :func:`~distrain.tricks.progressive.train_size`,
:func:`~distrain.tricks.ema.ema_decay`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distrain.config import Config
from distrain.optim import lr_at
from distrain.plan import BatchPlan, make_plan
from distrain.tricks.ema import ema_decay
from distrain.tricks.fixres import fixres_config
from distrain.tricks.progressive import train_size

MAX_POINTS = 4000


@dataclass
class Schedules:
    """Sampled schedules; ``update`` counts optimizer updates over all phases."""

    update: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    resolution: list[int] = field(default_factory=list)
    ema_decay: list[float] = field(default_factory=list)
    """Per-update decay of the EMA (the step decay spread over ``ema.every`` updates); NaN in a phase
    without EMA (FixRes), empty when the run has none."""
    phase_starts: list[int] = field(default_factory=list)


def schedules(cfg: Config, plan: BatchPlan) -> Schedules:
    """The schedules of ``cfg`` under ``plan``, followed by its FixRes phase if it has one."""
    out = Schedules()
    phases = [(cfg, plan)]
    if cfg.fixres.epochs:
        fixres = fixres_config(cfg)
        phases.append((fixres, make_plan(fixres, plan.world_size, plan.train_samples)))
    offset = 0
    for phase_cfg, phase_plan in phases:
        out.phase_starts.append(offset)
        total = phase_plan.total_updates
        for u in range(0, total, max(1, total // MAX_POINTS)):
            out.update.append(offset + u)
            out.lr.append(lr_at(u, phase_plan, phase_cfg.schedule))
            out.resolution.append(train_size(phase_cfg, u // phase_plan.updates_per_epoch))
            if cfg.ema.decay:
                e = phase_cfg.ema
                step = ema_decay(e.decay, e.every, u // e.every, e.warmup) if e.decay else float("nan")
                out.ema_decay.append(step ** (1 / e.every))
        offset += total
    return out


def plot_schedules(cfg: Config, plan: BatchPlan, path: str | Path) -> Path:
    """Draw :func:`schedules` to a PNG at ``path`` and return the path."""
    s = schedules(cfg, plan)
    rows = 3 if s.ema_decay else 2
    fig = Figure(figsize=(9.0, 2.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True)
    series = [("learning rate", s.lr), ("train resolution (px)", s.resolution)]
    if s.ema_decay:
        series.append(("EMA decay per update", s.ema_decay))
    for ax, (label, values) in zip(axes, series):
        ax.plot(s.update, values, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for start in s.phase_starts[1:]:
            ax.axvline(start, color="grey", ls="--", lw=0.8)
    axes[-1].set_xlabel("optimizer update")
    fixres = " (dashed: FixRes phase starts)" if len(s.phase_starts) > 1 else ""
    axes[0].set_title(
        f"{cfg.name}: {plan.world_size} x {plan.per_device} x {plan.accumulation} = batch {plan.global_batch}, "
        f"peak LR {plan.peak_lr:.4g}{fixres}", fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
