"""DeepSpeed ZeRO through Accelerate: the DeepSpeed config as a function of the recipe, and the
few helpers that partitioned (ZeRO-3) parameters need.

One source of truth: the micro-batch, accumulation, global batch, gradient clipping, precision and
ZeRO stage come from the distrain config and its batch plan. A user JSON
(``distributed.deepspeed_config``) may add anything else (bucket sizes, persistence thresholds,
offload details); its ``"auto"`` values are filled from the recipe, and a value that contradicts
the recipe stops the run with a message naming both keys.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from distrain.config import Config
from distrain.errors import DistrainError

# The DeepSpeed keys the recipe decides, and the distrain key to change instead.
RECIPE_KEYS = {
    "train_micro_batch_size_per_gpu": "batch.per_device (as planned)",
    "gradient_accumulation_steps": "batch.accumulation (as planned)",
    "train_batch_size": "the planned global batch",
    "gradient_clipping": "train.clip_grad_norm",
    "zero_optimization.stage": "distributed.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.offload_optimizer.device": "distributed.offload_optimizer",
    "zero_optimization.offload_param.device": "distributed.offload_params",
}
AUTO = "auto"


def uses_deepspeed(cfg: Config) -> bool:
    """Whether the run uses DeepSpeed: the recipe says so, or an Accelerate DeepSpeed launch config does."""
    return cfg.distributed.backend == "deepspeed" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _from_launch_config(cfg: Config) -> tuple[int, bool, bool]:
    """ZeRO stage and optimizer/parameter offload: the recipe's, unless an Accelerate DeepSpeed launch
    config chose DeepSpeed (and the recipe did not), in which case its values count."""
    d = cfg.distributed
    if d.backend == "deepspeed" or "ACCELERATE_DEEPSPEED_ZERO_STAGE" not in os.environ:
        return d.zero_stage, d.offload_optimizer, d.offload_params
    env = os.environ.get
    return (int(env("ACCELERATE_DEEPSPEED_ZERO_STAGE")),
            env("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu",
            env("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu")


def generated_config(cfg: Config, precision: str, per_device: int | str = AUTO, accumulation: int | str = AUTO,
                     global_batch: int | str = AUTO) -> dict:
    """The DeepSpeed config the recipe implies (batch fields stay "auto" until the plan exists).

    Args:
        cfg: The run's config.
        precision: Accelerate's resolved mixed precision ("no", "bf16" or "fp16").
        per_device, accumulation, global_batch: From the batch plan.
    """
    if cfg.optim.name in ("lars", "lamb"):
        raise DistrainError(
            f"optim.name: {cfg.optim.name} computes a trust ratio per layer, but DeepSpeed ZeRO hands the optimizer "
            "flattened partitions of many layers; use distributed.backend: ddp, or sgd/adamw"
        )
    stage, offload_optimizer, offload_params = _from_launch_config(cfg)
    zero: dict = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": per_device,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": global_batch,
        "gradient_clipping": cfg.train.clip_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # DeepSpeed casts only the parameters to 16 bits; BatchNorm refuses 16-bit weights next to
        # fp32 running statistics, so the buffers follow the parameters (as module.bfloat16() did).
        **({"data_types": {"buffer_dtype": precision}} if precision in ("bf16", "fp16") else {}),
        # distrain's optimizers (SGD, AdamW, LARS, LAMB) are torch ones, also under offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def merge_user_config(user: dict, ours: dict, source: str, _prefix: str = "") -> dict:
    """``user`` with its "auto" and missing recipe values filled from ``ours``.

    Raises:
        DistrainError: a user value contradicts the recipe's, naming the DeepSpeed key, the
            distrain key that decides it, and both values.
    """
    merged = dict(user)
    for key, value in ours.items():
        path = _prefix + key
        if isinstance(value, dict):
            theirs = user.get(key, {})
            merged[key] = merge_user_config(theirs if isinstance(theirs, dict) else {}, value, source, path + ".")
        elif key not in user or user[key] == AUTO or value == AUTO:
            merged[key] = user[key] if value == AUTO and key in user else value
        elif user[key] != value:
            owner = RECIPE_KEYS.get(path, "the recipe")
            raise DistrainError(
                f"{source}: {path} = {user[key]!r} contradicts {owner} = {value!r}; set it to 'auto' or change {owner}"
            )
    return merged


def user_config(cfg: Config) -> tuple[dict, str]:
    """The user's DeepSpeed JSON (from the recipe or the Accelerate launch config) and its path."""
    path = cfg.distributed.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not path or path == "none":
        return {}, ""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DistrainError(f"distributed.deepspeed_config: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise DistrainError(f"distributed.deepspeed_config: {path} is not a JSON object")
    return data, path


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += _auto_keys(value, prefix + key + ".")
        elif value == AUTO:
            found.append(prefix + key)
    return found


def deepspeed_config(cfg: Config, precision: str, **plan_values) -> dict:
    """The config DeepSpeed runs with: the user's JSON merged with :func:`generated_config`.

    Raises:
        DistrainError: the JSON contradicts the recipe, or has an "auto" the recipe does not decide
            (such as an offload device while the recipe's offload is off).
    """
    user, path = user_config(cfg)
    merged = merge_user_config(user, generated_config(cfg, precision, **plan_values), path or "deepspeed config")
    batch_keys = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"}
    unfilled = [k for k in _auto_keys(merged) if k not in batch_keys or plan_values]
    if unfilled:
        owners = ", ".join(f"{k} (set by {RECIPE_KEYS[k]})" if k in RECIPE_KEYS else k for k in unfilled)
        raise DistrainError(f"{path}: no value from the recipe for 'auto' in {owners}")
    return merged


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (each rank holds a slice, ``p.ds_tensor``)."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Full parameters on every rank for the block under ZeRO-3 (a collective); nothing otherwise."""
    if not is_partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def consolidated_state_dict(checkpoint: Path, what: str = "zero_to_fp32") -> dict[str, torch.Tensor]:
    """fp32 model weights of a DeepSpeed checkpoint made by ``accelerator.save_state``, merged from all
    ranks' partitions (DeepSpeed's zero_to_fp32), with the buffers (BN statistics) it saved.

    zero_to_fp32 reads with ``torch.load(weights_only=False)``; here its loads run weights_only (see
    :mod:`distrain.track.safeload`), so a file with pickled code is refused, not run.

    Args:
        checkpoint: The checkpoint directory.
        what: The command reading it, the start of an error message (``export``, ``eval``).

    Raises:
        DistrainError: the checkpoint holds no DeepSpeed model state, or a file in it holds pickled code.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from distrain.track.safeload import refusing_pickled_code

    tags = sorted(p.name for p in checkpoint.iterdir() if p.is_dir() and p.name.startswith("pytorch_model"))
    if not tags:
        raise DistrainError(f"{checkpoint}: no DeepSpeed model state (pytorch_model*/) in this checkpoint")
    with refusing_pickled_code(what):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tags[0])
    return {k: v.contiguous() if v.is_floating_point() else v for k, v in state.items()}


def fill_deepspeed_batch(cfg: Config, accelerator, plan) -> None:
    """Put the plan's micro-batch, accumulation and global batch into the DeepSpeed config before prepare.

    Raises:
        DistrainError: the user's DeepSpeed JSON sets one of them to another value.
    """
    filled = deepspeed_config(cfg, accelerator.mixed_precision, per_device=plan.per_device,
                              accumulation=plan.accumulation, global_batch=plan.global_batch)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        config[key] = filled[key]


def master_weights(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """Under DeepSpeed with bf16/fp16, every parameter's fp32 master copy, whole, on the CPU.

    The module DeepSpeed trains holds 16-bit copies of the weights; the optimizer's fp32 partitions
    are the real ones. Exporting the module's copies would round every weight to 8 (bf16) bits of
    mantissa. Every rank must call this (each parameter is assembled with a collective); outside
    DeepSpeed or in fp32 it returns ``{}`` (the module's weights are the masters).

    Args:
        accelerator: The run's Accelerator.
        model: The unwrapped module (parameter names as in its state dict).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED or accelerator.mixed_precision == "no":
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is not None:
            masters[name] = full.detach().float().cpu().clone()
    return masters


def input_dtype(accelerator) -> torch.dtype:
    """The dtype the model's inputs must have: the 16-bit one under DeepSpeed bf16/fp16, else float32.

    DeepSpeed casts the module itself to bf16/fp16 (no autocast), so float32 images would fail in
    the first convolution; DDP runs autocast, which takes float32 inputs.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
