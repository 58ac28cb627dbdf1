"""Build the Accelerator for a run and check that the launch produced the ranks it promised."""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from distrain.config import Config
from distrain.errors import DistrainError


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """Accelerate's ``mixed_precision`` for the configured precision.

    ``auto`` is bf16 on a GPU that supports it and fp32 elsewhere: CPU autocast is not faster
    on every CPU, and fp32 is the reference the tests compare against.
    """
    if precision == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def default_wandb_mode() -> None:
    """Run W&B offline unless the user configured credentials or chose a mode.

    Offline runs write everything under the run dir and never touch the network;
    ``wandb sync`` uploads them later.
    """
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def build_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for ``cfg``: devices, process group, precision, tracker.

    Gradient accumulation is set later, from the batch plan (it may depend on the world size).

    Without CUDA it forces the CPU path (gloo), because Accelerate otherwise starts ranks that
    never join one group (shared/NOTES-cpu-distributed.md, trap 2).

    Raises:
        DistrainError: the launcher announced WORLD_SIZE ranks but the process group has fewer.
    """
    on_gpu = torch.cuda.is_available()
    if cfg.deterministic:
        # cuBLAS reads this once, when CUDA initialises; deterministic GEMMs need it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # cuDNN autotuning picks the fastest kernels per shape, which may differ from run to run.
    torch.backends.cudnn.benchmark = on_gpu and not cfg.deterministic
    if cfg.logging.wandb:
        default_wandb_mode()
    accelerator = Accelerator(
        cpu=not on_gpu,
        mixed_precision=resolve_precision(cfg.train.precision, on_gpu),
        log_with="wandb" if cfg.logging.wandb else None,
        project_dir=str(cfg.out_dir),
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if cfg.model.compile else "no",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout_s))],
    )
    check_world_size(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    return accelerator


def check_world_size(launched: int, joined: int) -> None:
    """Refuse a run whose process group is smaller than what the launcher started.

    Ranks that each believe they are alone would train ``launched`` unsynchronised copies and
    exit 0 (shared/NOTES-cpu-distributed.md, trap 2).

    Raises:
        DistrainError: ``joined != launched``.
    """
    if joined != launched:
        raise DistrainError(
            f"the launcher set WORLD_SIZE={launched} but the process group has {joined} rank(s); "
            "on a machine without GPUs launch with ACCELERATE_USE_CPU=1 (see README, Multi-process)"
        )


def replica_fingerprints(
    model: torch.nn.Module, accelerator: Accelerator, extra: Iterable[torch.Tensor] = ()
) -> list[list[float]]:
    """[sum, sum of squares] of all parameters and ``extra`` tensors (float64) on each rank,
    gathered to every rank.

    Data-parallel replicas must hold bit-identical parameters (and EMA weights); differing
    fingerprints reveal a rank that skipped an update or a non-replicated change.
    """
    params = [p.detach().double() for p in accelerator.unwrap_model(model).parameters()]
    params += [t.detach().double() for t in extra]
    local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    gathered = accelerator.gather(local.to(accelerator.device).unsqueeze(0))
    return gathered.cpu().tolist()


def shutdown(accelerator: Accelerator) -> None:
    """Finish the trackers and destroy the process group, after dropping the prepared objects.

    A DDP model keeps its process group alive after ``destroy_process_group``; if it is only
    collected during interpreter shutdown, gloo's threads abort the process (SIGABRT, "terminate
    called without an active exception"). Callers must drop their own references first.
    """
    accelerator.free_memory()
    accelerator.end_training()
