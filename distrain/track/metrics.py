"""Metrics to ``metrics.jsonl`` and W&B, from rank 0 only.

Each logged event is one JSON line ``{"step": update, "epoch": e, "train/loss": ...}`` and the
same values go to W&B (through Accelerate's tracker, which only rank 0 opens) at the same step.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from accelerate import Accelerator

from distrain.config import Config, to_dict


class MetricsLogger:
    """Writes metric events; a no-op on ranks other than 0.

    Args:
        accelerator: The run's Accelerator (its tracker is W&B when enabled).
        cfg: The resolved config (sent to W&B as the run config).
        run_dir: The run directory (holds ``metrics.jsonl``, ``wandb/`` and the W&B run id).
        wandb_prefix: Prepended to W&B keys: a later phase (FixRes) logs into the W&B run that
            the main phase opened, under its own keys.
        step_offset: Added to W&B steps, which must keep increasing across phases.
        wandb_dir: Where the W&B run (and its id) lives: the top run dir, shared by all phases, so
            a run resumed in a later phase continues the same W&B run. None: ``run_dir``.
    """

    def __init__(
        self, accelerator: Accelerator, cfg: Config, run_dir: Path, wandb_prefix: str = "", step_offset: int = 0,
        wandb_dir: Path | None = None,
    ):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.prefix, self.offset = wandb_prefix, step_offset
        # Rank 0 alone owns the W&B run (and its id file: other ranks must not race on it).
        if cfg.logging.wandb and self.is_main and not accelerator.trackers:
            wandb_dir = wandb_dir or run_dir
            accelerator.init_trackers(
                cfg.logging.project,
                config=to_dict(cfg),
                init_kwargs={"wandb": {"dir": str(wandb_dir), "name": cfg.name, "id": _wandb_run_id(wandb_dir),
                                       "resume": "allow"}},
            )

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """Record ``values`` at optimizer update ``step``."""
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, **values}) + "\n")
        self.accelerator.log({self.prefix + k: v for k, v in values.items()}, step=self.offset + step)


    @property
    def has_wandb(self) -> bool:
        """Whether this rank logs to W&B (rank 0 with ``logging.wandb``)."""
        return self.is_main and bool(self.accelerator.trackers)

    def log_image(self, step: int, key: str, path: Path) -> None:
        """Log the PNG at ``path`` to W&B as an image at update ``step`` (it has no place in metrics.jsonl)."""
        if not self.has_wandb:
            return
        import wandb

        run = self.accelerator.get_tracker("wandb", unwrap=True)
        run.log({self.prefix + key: wandb.Image(str(path))}, step=self.offset + step)


def _wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run dir, created once, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_run_id"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(4) + "\n")
        os.replace(tmp, path)
    return path.read_text().strip()
