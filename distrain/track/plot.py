"""Training curves of a run dir as one PNG: loss, learning rate and eval accuracy.

The figure is drawn on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas rather than
through ``pyplot``, so it needs no display and leaves the global matplotlib backend alone.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distrain.errors import DistrainError

Series = dict[str, tuple[list[int], list[float]]]

_FIGSIZE = (9.0, 8.0)
_DPI = 100


def read_events(run_dir: str | Path) -> list[dict]:
    """The events of a run's ``metrics.jsonl``, skipping lines that are not JSON objects.

    It tolerates an event cut short by a crash, because a plot of the rest is still what the user
    wants; how many were skipped goes to stderr.
    The cut event has no newline, so a resumed run's first event lands on the same line; that event
    is recovered.

    Args:
        run_dir: The run directory.

    Returns:
        The events, in file order.

    Raises:
        DistrainError: The run dir or its ``metrics.jsonl`` is missing, or it holds no event.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise DistrainError(f"{run_dir}: no such run dir (expected it to hold metrics.jsonl)")
    if not path.is_file():
        raise DistrainError(f"{path}: no such file (has the run logged anything yet?)")
    events, bad = [], 0
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                event = _after_cut(line)
                if event is None:
                    continue
            if isinstance(event, dict) and isinstance(event.get("step"), int):
                events.append(event)
            else:
                bad += 1
    if bad:
        print(f"distrain: warning: skipped {bad} unreadable line(s) of {path}", file=sys.stderr)
    if not events:
        raise DistrainError(f"{path}: no metric events in it")
    return events


def _after_cut(line: str) -> dict | None:
    """The whole event that follows a cut-short one on ``line``, if there is one."""
    start = line.rfind('{"step"')
    if start <= 0:
        return None
    try:
        return json.loads(line[start:])
    except json.JSONDecodeError:
        return None


def collect_series(events: list[dict]) -> Series:
    """Per-key ``(steps, values)`` sorted by step, the later event winning on a repeated step.

    A run resumed from a checkpoint logs again the steps it had already logged after that checkpoint;
    the later values are those of the run that carried on, so they replace the earlier ones.

    Args:
        events: Events as in ``metrics.jsonl`` (``step``, ``epoch`` and metric keys).

    Returns:
        For every numeric metric key, its steps in increasing order and the values at them.
    """
    by_key: dict[str, dict[int, float]] = {}
    for event in events:
        step = event["step"]
        for key, value in event.items():
            # bool is an int subclass; a flag is not a curve
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            by_key.setdefault(key, {})[step] = float(value)
    return {key: (sorted(vals), [vals[s] for s in sorted(vals)]) for key, vals in by_key.items()}


def updates_per_epoch(events: list[dict]) -> float | None:
    """Optimizer updates per epoch, from the events logged at epoch ends, or None if unknown.

    Eval events are logged right after an epoch completes, with ``epoch`` = epochs done, so
    ``step / epoch`` is the epoch length there. The median ignores a final eval that a step limit
    placed mid-epoch.
    """
    ratios = [
        e["step"] / e["epoch"]
        for e in events
        if isinstance(e.get("epoch"), int) and e["epoch"] > 0 and any(k.startswith("eval/") for k in e)
    ]
    return statistics.median(ratios) if ratios else None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the training curves of a run dir into a PNG.

    Three panels share the x axis (optimizer updates; epochs on the top axis when the epoch length
    is known): train and eval loss, the learning rate, and eval top-1/top-5 (plus any other
    ``eval/*top1`` such as EMA) with the best ``eval/top1`` marked. A panel with nothing logged says
    so.

    Args:
        run_dir: The run directory holding ``metrics.jsonl``.
        out: Where to write the PNG; ``RUN_DIR/curves.png`` by default.

    Returns:
        The path written.

    Raises:
        DistrainError: The run dir or its ``metrics.jsonl`` is missing or empty.
    """
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    series = collect_series(events)
    upe = updates_per_epoch(events)
    last = max(e["step"] for e in events)
    out = Path(out) if out is not None else run_dir / "curves.png"

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_acc = fig.subplots(3, 1, sharex=True, height_ratios=[1.2, 0.8, 1.2])

    _loss_panel(ax_loss, series)
    _lr_panel(ax_lr, series)
    _accuracy_panel(ax_acc, series, upe, last)
    ax_acc.set_xlabel("optimizer updates")
    for ax in (ax_loss, ax_lr, ax_acc):
        ax.grid(True, alpha=0.3)
    # sharex autoscaling ignores an empty panel, so pin the range to every step logged, with room
    # for the marker of an eval at the last step
    ax_acc.set_xlim(0, (last or 1) * 1.02)

    if upe:
        top = ax_loss.secondary_xaxis("top", functions=(lambda s: s / upe, lambda e: e * upe))
        top.set_xlabel("epoch")

    top1 = series.get("eval/top1")
    final = f"final eval top-1 {top1[1][-1]:.2f}%" if top1 else "no eval yet"
    fig.suptitle(f"{run_dir.resolve().name} — {final}")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    return out


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_yticks([])


def _loss_panel(ax, series: Series) -> None:
    ax.set_ylabel("loss")
    drawn = []
    if "train/loss" in series:
        ax.plot(*series["train/loss"], lw=1, alpha=0.8, label="train")
        drawn += series["train/loss"][1]
    if "eval/loss" in series:
        ax.plot(*series["eval/loss"], "o-", ms=3, lw=1.5, label="eval")
        drawn += series["eval/loss"][1]
    if not drawn:
        _no_data(ax, "train/loss or eval/loss")
        return
    finite = [v for v in drawn if math.isfinite(v)]
    # losses fall by orders of magnitude; a linear axis flattens everything after the first epochs
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.legend(loc="upper right")


def _lr_panel(ax, series: Series) -> None:
    ax.set_ylabel("learning rate")
    if "train/lr" not in series:
        _no_data(ax, "train/lr")
        return
    ax.plot(*series["train/lr"], lw=1.5, color="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _accuracy_panel(ax, series: Series, upe: float | None, last_step: int) -> None:
    ax.set_ylabel("eval accuracy (%)")
    keys = [k for k in ("eval/top1", "eval/top5") if k in series]
    keys += sorted(k for k in series if k.startswith("eval/") and k.endswith("top1") and k not in keys)
    if not keys:
        _no_data(ax, "eval accuracy")
        return
    for key in keys:
        ax.plot(*series[key], "o-", ms=3, lw=1.5, label=key.removeprefix("eval/"))
    ax.legend(loc="lower right")
    if "eval/top1" not in series:
        return
    steps, values = series["eval/top1"]
    i = max(range(len(values)), key=values.__getitem__)  # first of equal bests: when it was reached
    where = f"update {steps[i]}" + (f", epoch {steps[i] / upe:g}" if upe else "")
    ax.plot(steps[i], values[i], "*", ms=12, color="tab:red", zorder=5)
    # below-right of the best point lies under the plateau that follows it, the emptiest part of an
    # accuracy plot; only a best near the right edge (no room there) puts the text to its left
    right_half = steps[i] > 0.7 * last_step
    ax.annotate(
        f"best top-1 {values[i]:.2f}%\n({where})",
        (steps[i], values[i]),
        xytext=(-12 if right_half else 12, -18),
        textcoords="offset points",
        ha="right" if right_half else "left",
        va="top",
        fontsize=9,
        arrowprops={"arrowstyle": "-", "color": "0.4"},
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
    )
