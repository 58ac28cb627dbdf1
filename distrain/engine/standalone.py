"""``distrain eval``: evaluate a saved checkpoint with the same exactly-once eval as training,
optionally sweeping the eval resize."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distrain.config import Config, apply_overrides, from_dict
from distrain.data.device import ToDevice
from distrain.engine.build import build_model, eval_stream, loader, resolve_data
from distrain.engine.evaluate import evaluate, sample_hits
from distrain.errors import DistrainError
from distrain.models.norms import check_norm_runtime
from distrain.parallel import build_accelerator
from distrain.parallel.deepspeed import consolidated_state_dict
from distrain.parallel.setup import shutdown
from distrain.track.checkpoint import load_trainer_state, resolve_resume
from distrain.track.confusion import confusion_record
from distrain.track.progress import Progress
from distrain.tricks.resize_sweep import SweepResult, default_resizes, pick_resize

MODEL_FILE = "model.safetensors"


def _checkpoint_config(target: str, overrides: list[str]) -> tuple[Path, Config]:
    """The checkpoint ``target`` names and its own config with ``overrides`` on top."""
    if not Path(target).exists():
        raise DistrainError(f"{target}: no such run dir or checkpoint")
    checkpoint = resolve_resume(target, Path(target))
    saved = load_trainer_state(checkpoint).config
    # Plain PyTorch (DDP) whatever the run used: the weights are consolidated on load.
    fixed = ["logging.wandb=false", "logging.progress=false", "distributed.backend=ddp", "distributed.deepspeed_config="]
    cfg = from_dict(apply_overrides(saved, [*fixed, *overrides]))
    if not cfg.data.eval:
        raise DistrainError("data.eval: the checkpoint's config has no eval shards; pass data.eval=PATH")
    return checkpoint, cfg


def model_weights(checkpoint: Path, what: str = "load") -> dict[str, torch.Tensor]:
    """The fp32 model weights of a checkpoint: saved whole (DDP, safetensors), or merged from the
    ranks' ZeRO partitions (DeepSpeed).

    Args:
        checkpoint: The checkpoint directory.
        what: The command reading it, the start of an error message.

    Raises:
        DistrainError: a DeepSpeed file in it holds pickled code (refused, never run).
    """
    if (checkpoint / MODEL_FILE).is_file():
        return load_file(checkpoint / MODEL_FILE)
    return consolidated_state_dict(checkpoint, what)


def export_checkpoint(target: str, out: str) -> Path:
    """Write the model weights of a run dir's newest checkpoint (or of ``target`` itself) to ``out``.

    ``.safetensors`` is written as safetensors, anything else with ``torch.save``; either loads into
    the model with ``load_state_dict`` in plain PyTorch on one process.

    Raises:
        DistrainError: no such run dir or checkpoint, or a file in it holds pickled code.
    """
    if not Path(target).exists():
        raise DistrainError(f"{target}: no such run dir or checkpoint")
    checkpoint = resolve_resume(target, Path(target))
    weights = {k: v.contiguous() for k, v in model_weights(checkpoint, "export").items()}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path)
    return path


def evaluate_checkpoint(target: str, overrides: list[str], resizes: list[int] | None = None) -> dict | None:
    """Eval metrics of the model in a checkpoint (or a run dir's newest), on every rank.

    The checkpoint's own config is used, with ``overrides`` on top (e.g. another ``data.eval``).

    Args:
        target: A run dir or a checkpoint dir.
        overrides: ``section.key=value`` strings.
        resizes: Sweep these eval resizes instead ([] picks candidates around the crop): see
            :mod:`distrain.tricks.resize_sweep`.

    Returns:
        On rank 0 the metrics plus ``checkpoint`` and the per-class results (``classes``,
        ``per_class_top1``, ``confusion``: see :func:`~distrain.track.confusion.confusion_record`), or
        for a sweep ``sweep`` (a :class:`SweepResult`), ``configured`` (the config's resize) and
        ``checkpoint``; None on other ranks.

    Raises:
        DistrainError: no checkpoint, the config has no eval shards, a resize below the crop, or a
            checkpoint file that holds pickled code.
    """
    checkpoint, cfg = _checkpoint_config(target, overrides)
    if resizes is not None:
        resizes = resizes or default_resizes(cfg.data.eval_crop, cfg.data.eval_resize)
        small = [r for r in resizes if r < cfg.data.eval_crop]
        if small:
            raise DistrainError(f"--resizes: {small} smaller than data.eval_crop {cfg.data.eval_crop}")
    accelerator = build_accelerator(cfg)
    data = resolve_data(cfg)
    check_norm_runtime(cfg.model.norm, accelerator.device)
    model = build_model(cfg, data.num_classes)
    model.load_state_dict(model_weights(checkpoint, "eval"))
    model = accelerator.prepare(model)
    to_device = ToDevice(cfg.data.mean, cfg.data.std, accelerator.device, cfg.model.channels_last)
    rank, world = accelerator.process_index, accelerator.num_processes

    def stream(c: Config):
        return loader(c, eval_stream(c, data.eval, rank, world, data.num_classes))

    if resizes is None:
        metrics = evaluate(model, stream(cfg), to_device, accelerator)
        classes = data.eval.classes or data.train.classes
        result = {**metrics, "checkpoint": str(checkpoint), **confusion_record(metrics.confusion, classes)}
    else:
        hits = {}
        progress = Progress(len(resizes), 0, main=accelerator.is_main_process, unit="resize")
        for r in resizes:
            swept = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_resize=r))
            hits[r] = sample_hits(model, stream(swept), to_device, accelerator)
            progress.update(resize=r)
        progress.close()
        try:
            sweep = pick_resize(hits)
        except ValueError as e:
            raise DistrainError(f"--resize-sweep: {e}") from None
        result = {"sweep": sweep, "configured": cfg.data.eval_resize, "crop": cfg.data.eval_crop,
                  "checkpoint": str(checkpoint)}
    del model
    shutdown(accelerator)
    return result if accelerator.is_main_process else None


def format_sweep(result: dict) -> str:
    """The sweep as a table, then the pick on half A and its top-1 on half B."""
    s: SweepResult = result["sweep"]
    conf = result["configured"]
    lines = [f"{'resize':>6}  {'top-1 half A (pick)':>19}  {'top-1 half B (report)':>21}"]
    for r in sorted(s.top1_a):
        mark = " <- picked" if r == s.picked else (" (configured)" if r == conf else "")
        lines.append(f"{r:>6}  {s.top1_a[r]:>18.2f}%  {s.top1_b[r]:>20.2f}%{mark}")
    configured = (f"; configured resize {conf}: {s.top1_b[conf]:.2f}%" if conf in s.top1_b else "")
    lines.append(
        f"picked eval resize {s.picked} (crop {result['crop']}) on half A ({s.samples[0]} samples); "
        f"top-1 on half B ({s.samples[1]} samples): {s.top1_b[s.picked]:.2f}%{configured}. "
        f"Use it with data.eval_resize={s.picked}"
    )
    return "\n".join(lines)
