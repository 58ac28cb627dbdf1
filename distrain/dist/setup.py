"""Build the Accelerator for a run and check that the launch produced the ranks it promised."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from distrain.config import Config
from distrain.dist.deepspeed import deepspeed_config, gathered, uses_deepspeed
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
    if not os.environ.get("WANDB_MODE"):
        os.environ.pop("WANDB_MODE", None)  # set but empty: wandb would refuse it
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
    precision = resolve_precision(cfg.train.precision, on_gpu)
    timeout = timedelta(seconds=cfg.distributed.timeout_s)
    plugin = None
    if uses_deepspeed(cfg):
        missing = [m for m in ("deepspeed", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise DistrainError(f"distributed.backend: deepspeed needs {' and '.join(missing)}: "
                                "pip install -e '.[deepspeed]' (from the distrain checkout)")
        # torch 2.14 deprecates collectives DeepSpeed calls; the warning says nothing to a user.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        # The batch fields stay "auto" here; the loop fills them from the plan before prepare.
        config = deepspeed_config(cfg, precision)
        # That config has consumed an Accelerate DeepSpeed launch config's fields (stage, offload),
        # which Accelerate would otherwise refuse next to a full DeepSpeed config.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        plugin = DeepSpeedPlugin(hf_ds_config=config)
    accelerator = Accelerator(
        # cpu=True would switch the DeepSpeed path off; without it a CPU DeepSpeed run needs gloo
        # named explicitly, or every rank believes it is alone (NOTES-cpu-distributed, trap 3).
        cpu=not on_gpu and plugin is None,
        deepspeed_plugin=plugin,
        mixed_precision=precision,
        log_with="wandb" if cfg.logging.wandb else None,
        project_dir=str(cfg.out_dir),
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if cfg.model.compile else "no",
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo" if plugin and not on_gpu else "nccl", timeout=timeout)],
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
    unwrapped = accelerator.unwrap_model(model)
    with gathered(unwrapped):  # ZeRO-3: compare whole parameters, not each rank's slice
        params = [p.detach().double() for p in unwrapped.parameters()]
    params += [t.detach().double() for t in extra]
    local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    return accelerator.gather(local.to(accelerator.device).unsqueeze(0)).cpu().tolist()


def shutdown(accelerator: Accelerator) -> None:
    """Finish the trackers and destroy the process group, after dropping the prepared objects.

    A DDP model keeps its process group alive after ``destroy_process_group``; if it is only
    collected during interpreter shutdown, gloo's threads abort the process (SIGABRT, "terminate
    called without an active exception"). Callers must drop their own references first.
    """
    accelerator.free_memory()
    accelerator.end_training()


@torch.no_grad()
def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every rank rank 0's buffers (BN running statistics), as DDP does before each forward.

    DeepSpeed does not synchronise buffers, so without this each rank would evaluate, and the
    ranks would diverge, on statistics of its own batches only.
    """
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer, src=0)
