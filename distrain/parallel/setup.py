"""Build the Accelerator for a run and check that the launch produced the ranks it promised."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, broadcast_object_list

from distrain.config import Config
from distrain.errors import DistrainError
from distrain.parallel.deepspeed import deepspeed_config, gathered, uses_deepspeed

T = TypeVar("T")


def rank_gpu() -> torch.device | None:
    """This rank's GPU, chosen as Accelerate chooses it: ``LOCAL_RANK`` modulo the visible GPUs.

    None without CUDA.
    """
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware: compute capability 8.0 or newer (A100, H100,
    RTX 30xx and later), or any ROCm GPU.

    This is ``torch.cuda.is_bf16_supported(including_emulation=False)``, asked of ``device`` rather
    than of the current device, which is still cuda:0 on every rank before Accelerate sets it. Older
    GPUs (V100, T4) only emulate bf16, without their tensor cores, which do fp16.
    """
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, gpu: torch.device | None) -> str:
    """Accelerate's ``mixed_precision`` for the configured precision on this rank's GPU (None: CPU).

    ``auto`` is bf16 on a GPU with native bf16, fp16 on older GPUs (Accelerate then scales the
    loss with a GradScaler, and DeepSpeed with its dynamic loss scale), and fp32 on CPU: CPU
    autocast is not faster on every CPU, and fp32 is the reference the tests compare against.
    """
    if precision == "auto":
        if gpu is None:
            return "no"
        return "bf16" if has_native_bf16(gpu) else "fp16"
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
    if on_gpu and os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1") == "1":
        # torch's 3 and torchrun's 1 SIGABRT a rank whose peer died; 2 only aborts the communicators,
        # so its next collective raises DistBackendError and it exits 77 (README, When things go wrong).
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    if cfg.deterministic:
        # cuBLAS reads this once, when CUDA initialises; deterministic GEMMs need it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # cuDNN autotuning picks the fastest kernels per shape, which may differ from run to run.
    torch.backends.cudnn.benchmark = on_gpu and not cfg.deterministic
    if cfg.logging.wandb:
        default_wandb_mode()
    precision = resolve_precision(cfg.train.precision, rank_gpu())
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


# The gloo group that host_group made, with the default group it was made for (to notice a new one).
_host_group: tuple[torch.distributed.ProcessGroup, torch.distributed.ProcessGroup] | None = None


def host_group(accelerator: Accelerator) -> torch.distributed.ProcessGroup | None:
    """A gloo group of all ranks for small collectives of host values (stop flags, counts); None
    means the default group, which is gloo already on CPU runs.

    Over NCCL such a collective runs on the GPU, so reading its result waits for all the GPU work
    queued before it: a host synchronisation per call. Over gloo it is a ring of small TCP messages
    between the hosts (2 x (ranks - 1) steps) and leaves the GPU queue alone. Made on the first
    call after the default group exists, with the run's ``distributed.timeout_s``; the end of the
    run (``destroy_process_group``) shuts it down with the default group. ``new_group`` is
    collective: every rank must make its first call at the same point of the run, as the loop does
    (at the same update).
    """
    global _host_group
    if torch.distributed.get_backend() == "gloo":
        return None
    world = torch.distributed.group.WORLD
    if _host_group is None or _host_group[0] is not world:
        timeout = accelerator.init_handler.timeout if accelerator.init_handler is not None else None
        _host_group = (world, torch.distributed.new_group(backend="gloo", timeout=timeout))
    return _host_group[1]


def replica_fingerprints(
    model: torch.nn.Module, accelerator: Accelerator, extra: Iterable[torch.Tensor] = ()
) -> list[list[float]]:
    """[sum, sum of squares] of all parameters, buffers and ``extra`` tensors (float64) on each
    rank, gathered to every rank.

    Data-parallel replicas must hold bit-identical parameters (and EMA weights), and identical
    buffers once :func:`sync_buffers` has run; differing
    fingerprints reveal a rank that skipped an update or a non-replicated change.
    """
    unwrapped = accelerator.unwrap_model(model)
    with gathered(unwrapped):  # ZeRO-3: compare whole parameters, not each rank's slice
        params = [p.detach().double() for p in unwrapped.parameters()]
    params += [b.detach().double() for b in unwrapped.buffers()]
    params += [t.detach().double() for t in extra]
    local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    return accelerator.gather(local.to(accelerator.device).unsqueeze(0)).cpu().tolist()


def decided_by_main(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its result (or its DistrainError) given to every rank.

    For decisions read from the file system (which checkpoint to load, which phase to resume):
    every rank must take the same one, and a rank whose view of a network file system lags would
    otherwise take another and wait for the others in a collective that never comes.
    """
    if accelerator.num_processes == 1:
        return decide()
    result = error = None
    if accelerator.is_main_process:
        try:
            result = decide()
        except DistrainError as e:
            error = str(e)
    result, error = broadcast_object_list([result, error])
    if error is not None:
        raise DistrainError(error)
    return result


def shutdown(accelerator: Accelerator) -> None:
    """Finish the trackers and destroy the process group, after dropping the prepared objects.

    A DDP model keeps its process group alive after ``destroy_process_group``; if it is only
    collected during interpreter shutdown, gloo's threads abort the process (SIGABRT, "terminate
    called without an active exception"). Callers must drop their own references first.
    """
    accelerator.free_memory()
    accelerator.end_training()
    drop_host_group()


def drop_host_group() -> None:
    """Forget the group :func:`host_group` made, once the process groups are destroyed.

    A gloo group still referenced at interpreter shutdown aborts the process like a live DDP model
    does (see :func:`shutdown`).
    """
    global _host_group
    _host_group = None


@torch.no_grad()
def broadcast_from_main(tensors: Iterable[torch.Tensor], accelerator: Accelerator) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in one broadcast per dtype.

    The tensors must have the same names, shapes and order on every rank.
    """
    if accelerator.num_processes == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every rank rank 0's buffers (BN running statistics), as DDP does before each forward.

    One rule for all buffers of a run, raw and EMA alike: rank 0's are the run's. Under DDP that
    is what every forward starts from (its buffer broadcast), what the checkpoint holds and what
    a resumed run starts from on every rank, so applying it at eval and save keeps resume exact.
    DeepSpeed does not synchronise buffers, so without this each rank would evaluate, and the
    ranks would diverge, on statistics of its own batches only.
    """
    broadcast_from_main(accelerator.unwrap_model(model).buffers(), accelerator)
