"""``distrain eval``: evaluate a saved checkpoint with the same exactly-once eval as training."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from distrain.config import apply_overrides, from_dict
from distrain.data.device import ToDevice
from distrain.dist import build_accelerator
from distrain.dist.setup import shutdown
from distrain.engine.build import build_model, eval_stream, loader, resolve_data
from distrain.engine.evaluate import evaluate
from distrain.errors import DistrainError
from distrain.track.checkpoint import load_trainer_state, resolve_resume

MODEL_FILE = "model.safetensors"


def evaluate_checkpoint(target: str, overrides: list[str]) -> dict | None:
    """Eval metrics of the model in a checkpoint (or a run dir's newest), on every rank.

    The checkpoint's own config is used, with ``overrides`` on top (e.g. another ``data.eval``).

    Returns:
        The metrics plus ``checkpoint`` on rank 0; None on other ranks.

    Raises:
        DistrainError: no checkpoint, or the config has no eval shards.
    """
    if not Path(target).exists():
        raise DistrainError(f"{target}: no such run dir or checkpoint")
    checkpoint = resolve_resume(target, Path(target))
    saved = load_trainer_state(checkpoint).config
    cfg = from_dict(apply_overrides(saved, ["logging.wandb=false", "logging.progress=false", *overrides]))
    if not cfg.data.eval:
        raise DistrainError("data.eval: the checkpoint's config has no eval shards; pass data.eval=PATH")
    accelerator = build_accelerator(cfg)
    data = resolve_data(cfg)
    model = build_model(cfg, data.num_classes)
    model.load_state_dict(load_file(checkpoint / MODEL_FILE))
    model = accelerator.prepare(model)
    to_device = ToDevice(cfg.data.mean, cfg.data.std, accelerator.device, cfg.model.channels_last)
    stream = eval_stream(cfg, data.eval, accelerator.process_index, accelerator.num_processes, data.num_classes)
    metrics = evaluate(model, loader(cfg, stream), to_device, accelerator)
    del model
    shutdown(accelerator)
    if not accelerator.is_main_process:
        return None
    return {**metrics, "checkpoint": str(checkpoint)}
