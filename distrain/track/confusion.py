"""Per-class eval results: the confusion matrix as JSON (one file per eval) and as a PNG.

The figure is drawn on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas, as in
:mod:`distrain.track.plot`: no display needed, the global matplotlib backend left alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from distrain.engine.evaluate import class_recalls

EVAL_DIR = "eval"
"""The run dir's folder of per-eval confusion files."""

_TEXT_UP_TO = 30
"""Classes up to which each cell shows its percentage and each tick its class name."""


def class_names(classes: Sequence[str], n: int) -> list[str]:
    """Names of ``n`` classes: the shard index's, then the class index for any it does not name."""
    return [str(classes[c]) if c < len(classes) else str(c) for c in range(n)]


def confusion_record(confusion: torch.Tensor, classes: Sequence[str] = ()) -> dict:
    """The JSON form of a confusion matrix.

    Args:
        confusion: ``[true class, predicted top-1 class]`` counts.
        classes: Class names (the eval shard index's); missing ones are the class index.

    Returns:
        ``classes`` (names), ``per_class_top1`` (percent; null for a class absent from the eval
        set) and ``confusion`` (the raw counts, one list per true class).
    """
    return {"classes": class_names(classes, len(confusion)), "per_class_top1": class_recalls(confusion),
            "confusion": confusion.tolist()}


def confusion_path(run_dir: Path, update: int) -> Path:
    """Where the eval at optimizer update ``update`` writes its confusion matrix."""
    return run_dir / EVAL_DIR / f"confusion-update-{update:08d}.json"


def write_confusion(run_dir: Path, update: int, epoch: int, metrics: dict, confusion: torch.Tensor,
                    classes: Sequence[str] = ()) -> Path:
    """Write one eval's metrics and confusion matrix to ``RUN_DIR/eval/confusion-update-NNNNNNNN.json``.

    Written whole or not at all (a temporary file renamed), so a reader never sees half a matrix.

    Args:
        update: The optimizer update of the eval; ``epoch``: epochs done.
        metrics: The eval's metrics (``eval/top1``, ``eval/balanced_top1``...).
        confusion: ``[true class, predicted top-1 class]`` counts.
        classes: Class names.

    Returns:
        The path written.
    """
    path = confusion_path(run_dir, update)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"step": update, "epoch": epoch, **metrics, **confusion_record(confusion, classes)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def plot_confusion(confusion: torch.Tensor | Sequence[Sequence[int]], classes: Sequence[str], out: str | Path,
                   title: str = "") -> Path:
    """Draw a confusion matrix, each row normalised to 100% (the diagonal is each class's top-1).

    Up to 30 classes, each cell shows its percentage and the axes the class names, with each
    class's sample count; beyond, only the colours (a 1000-class matrix stays a readable image
    with its diagonal). A class absent from the eval set is a grey row.

    Args:
        confusion: ``[true class, predicted top-1 class]`` counts.
        classes: Class names; missing ones are the class index.
        out: The PNG path.
        title: Above the matrix.

    Returns:
        The path written.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.as_tensor(confusion, dtype=torch.float64)
    n = len(counts)
    totals = counts.sum(dim=1, keepdim=True)
    percent = (100 * counts / totals).numpy()  # NaN rows (no sample) are drawn in the "bad" colour
    names = class_names(classes, n)
    small = n <= _TEXT_UP_TO
    side = min(max(5.0, 3.0 + 0.45 * n), 16.0) if small else 10.0
    # At least one pixel per cell, so that no class's diagonal is averaged away.
    dpi = max(100, math.ceil(n / (0.75 * side)))
    fig = Figure(figsize=(side + 1.5, side), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(percent, cmap=colormaps["Blues"].with_extremes(bad="0.85"), vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the true class")
    ax.set_xlabel("predicted class (top-1)")
    ax.set_ylabel("true class")
    if small:
        ax.set_xticks(range(n), names, rotation=90 if max(map(len, names), default=0) > 3 else 0)
        ax.set_yticks(range(n), [f"{name} ({int(t)})" for name, t in zip(names, totals[:, 0].tolist())])
        for row, col in zip(*np.nonzero(np.nan_to_num(percent))):  # an empty cell stays blank, not "0"
            value = percent[row, col]
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 60 else "black")
    if title:
        ax.set_title(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out

