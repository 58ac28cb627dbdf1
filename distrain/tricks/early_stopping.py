"""Early stopping (``early_stopping.*``): end the run once an eval metric has stopped improving.

:class:`EarlyStopping` is a small state machine fed each evaluation's metrics. The loop's eval
all-reduces its sums, so every rank holds the same metric values and reaches the same decision
without a collective of its own. Its state (best value, where it was reached, evaluations since)
goes into every checkpoint, so a resumed run (a SLURM requeue) keeps counting where it stopped
instead of granting a fresh ``patience``.
"""

from __future__ import annotations

import math

from distrain.config import Config, EarlyStoppingConfig
from distrain.errors import DistrainError

EVAL_METRICS = ("eval/loss", "eval/top1", "eval/top5", "eval/balanced_top1", "eval/worst_class_top1")
"""What every evaluation logs that can improve (``eval/samples`` and ``eval/skipped`` are counts)."""
_DOWNWARDS = ("loss",)


def logged_eval_metrics(cfg: Config) -> list[str]:
    """The eval metrics a run of ``cfg`` logs: :data:`EVAL_METRICS`, and their ``eval/ema_*`` twins under
    EMA; a self-supervised phase logs its kNN monitor's top-1 alone."""
    if cfg.ssl.method != "none":
        return ["eval/knn_top1", *(["eval/ema_knn_top1"] if cfg.ema.decay else [])]
    ema = [f"eval/ema_{m}" for m in ("loss", "top1", "top5")] if cfg.ema.decay else []  # the EMA's eval logs these
    return [*EVAL_METRICS, *ema]


def check_config(cfg: Config) -> None:
    """Refuse early-stopping settings that could never stop the run as meant (before anything starts).

    Raises:
        DistrainError: naming the key: a negative patience or min_delta, no eval set, a metric that
            is not an eval metric or that this run never logs, or a mode against the metric's sense
            (``max`` for a loss, ``min`` for an accuracy).
    """
    es = cfg.early_stopping
    EarlyStopping.from_config(es)  # the values' own ranges
    if not es.patience and not es.restore_best:
        return
    key = "early_stopping.patience" if es.patience else "early_stopping.restore_best"
    if not cfg.data.eval:
        raise DistrainError(f"{key}: needs evaluations, but data.eval is empty")
    if es.restore_best and (not cfg.checkpoint.keep_best or cfg.eval.every_epochs % cfg.checkpoint.every_epochs):
        # The best weights are read back from the checkpoint of the best evaluation.
        raise DistrainError(
            f"early_stopping.restore_best: needs a checkpoint at every evaluation, kept when best: "
            f"checkpoint.keep_best=true and eval.every_epochs ({cfg.eval.every_epochs}) a multiple of "
            f"checkpoint.every_epochs ({cfg.checkpoint.every_epochs})"
        )
    logged = logged_eval_metrics(cfg)
    if not es.metric.startswith("eval/"):
        raise DistrainError(f"early_stopping.metric: {es.metric!r} is not an eval metric (one of {', '.join(logged)})")
    if es.metric not in logged:
        hint = "; eval/ema_* need ema.decay > 0" if es.metric.startswith("eval/ema_") else ""
        raise DistrainError(f"early_stopping.metric: this run never logs {es.metric!r} (it logs "
                            f"{', '.join(logged)}{hint})")
    downwards = es.metric.endswith(_DOWNWARDS)
    if (es.mode == "min") != downwards:
        right = "min" if downwards else "max"
        raise DistrainError(f"early_stopping.mode: {es.mode} for {es.metric}, which improves "
                            f"{'downwards' if downwards else 'upwards'}; set early_stopping.mode={right}")


class EarlyStopping:
    """Stop after ``patience`` evaluations in a row without an improvement of more than ``min_delta``.

    An evaluation improves when its value beats the best so far by strictly more than
    ``min_delta`` (``value > best + min_delta`` under ``max``, ``value < best - min_delta`` under
    ``min``), as in Keras and Lightning: with ``min_delta`` 0 an equal value is no improvement. A
    smaller gain does not move the best either, so slow drifts below ``min_delta`` per evaluation
    still run out the patience. A non-finite value never improves. ``patience`` 0 never stops (the
    best is still tracked).

    Args:
        metric: ``early_stopping.metric``, a key of the eval metrics (``eval/top1``).
        mode: ``max`` or ``min``.
        patience: Evaluations without improvement before stopping; 0 is off.
        min_delta: Smallest change that counts as an improvement (>= 0).

    Raises:
        DistrainError: a mode other than max/min, or a negative patience or min_delta.
    """

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float):
        if mode not in ("max", "min"):
            raise DistrainError(f"early_stopping.mode: {mode!r} is not max or min")
        if patience < 0:
            raise DistrainError(f"early_stopping.patience: {patience} must be >= 0 (0 is off)")
        if not min_delta >= 0:
            raise DistrainError(f"early_stopping.min_delta: {min_delta} must be >= 0")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch = self.best_update = 0
        self.evals_since_best = 0

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig) -> EarlyStopping:
        """The state machine of ``early_stopping.*`` (``restore_best`` is the loop's business)."""
        return cls(cfg.metric, cfg.mode, cfg.patience, cfg.min_delta)

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, metrics: dict[str, float], *, epoch: int, update: int) -> bool:
        """Take one evaluation into account; every rank calls it with the same metrics.

        Args:
            metrics: The evaluation's metrics (``eval/top1``, ...).
            epoch: Epochs completed at this evaluation (reported in :attr:`reason`).
            update: Optimizer updates done at this evaluation.

        Returns:
            Whether the run should stop now.

        Raises:
            DistrainError: ``metrics`` lacks the metric.
        """
        if self.metric not in metrics:
            raise DistrainError(f"early_stopping.metric: {self.metric!r} is not among the eval metrics "
                                f"({', '.join(sorted(metrics))})")
        value = float(metrics[self.metric])
        if self._improves(value):
            self.best, self.best_epoch, self.best_update, self.evals_since_best = value, epoch, update, 0
        else:
            self.evals_since_best += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        """Whether the patience has run out (also right after loading the state of a run that stopped)."""
        return 0 < self.patience <= self.evals_since_best

    @property
    def reason(self) -> str:
        """Why the run stops, for the log and the summary; "" while it does not."""
        if not self.stopped:
            return ""
        best = (f"best {self.best:.6g} at epoch {self.best_epoch}, update {self.best_update}"
                if self.best is not None else "no finite value yet")
        return (f"early stop: {self.metric} did not improve by more than {self.min_delta:g} for "
                f"{self.evals_since_best} evaluations ({best})")

    def state_dict(self) -> dict:
        """The state to save in a checkpoint (JSON-serialisable)."""
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "best_update": self.best_update, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's state.

        A state of another metric or mode (or none: a checkpoint from before early stopping) is
        not carried over: the count starts afresh. ``patience`` and ``min_delta`` are this run's,
        so a resume may change them.
        """
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            return
        self.best, self.best_epoch, self.best_update = state["best"], state["best_epoch"], state["best_update"]
        self.evals_since_best = state["evals_since_best"]
