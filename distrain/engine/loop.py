"""The training loop: read this file top to bottom to know what a distrain run does.

Vocabulary: a *micro-batch* is what one device runs forward/backward on; an *update* is one
optimizer step, made every ``batch.accumulation`` micro-batches with gradients averaged over all
ranks; every schedule (LR, logging, checkpoints) counts updates. The batch maths come from
:mod:`distrain.plan` and nowhere else.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from distrain.config import Config, dump, to_dict
from distrain.data.device import ToDevice
from distrain.dist import build_accelerator
from distrain.dist.setup import replica_fingerprints
from distrain.engine.build import build_model, eval_stream, loader, prepare_builtin, resolve_data, train_stream
from distrain.engine.evaluate import evaluate
from distrain.optim import create_optimizer, lr_at
from distrain.plan import BatchPlan, make_plan
from distrain.track.checkpoint import TrainerState, load_trainer_state, resolve_resume, save_checkpoint
from distrain.track.metrics import MetricsLogger
from distrain.track.progress import Progress


class _Window:
    """Training loss and throughput since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.micro_batches, self.updates, self.start = 0, 0, time.perf_counter()

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _start_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    run_dir = cfg.out_dir
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump(cfg))
    accelerator.wait_for_everyone()
    return run_dir


def train(cfg: Config, resume: str | None = None) -> dict:
    """Run the training described by ``cfg``; every rank calls this.

    Args:
        cfg: The validated config.
        resume: ``"auto"`` (newest checkpoint of the run dir, if any) or a checkpoint path.

    Returns:
        The final summary: run dir, updates, epochs, the last eval metrics.
    """
    accelerator = build_accelerator(cfg)
    run_dir = _start_run_dir(cfg, accelerator)
    set_seed(cfg.seed)
    prepare_builtin(cfg, accelerator)
    data = resolve_data(cfg)
    plan = make_plan(cfg, accelerator.num_processes, data.train.total)

    model = build_model(cfg, data.num_classes)
    optimizer = create_optimizer(model, cfg.optim, lr_at(0, plan, cfg.schedule))
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    to_device = ToDevice(cfg.data.mean, cfg.data.std, accelerator.device, cfg.model.channels_last)

    state = TrainerState(config=to_dict(cfg))
    checkpoint = resolve_resume(resume, run_dir) if resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = load_trainer_state(checkpoint)

    stream = train_stream(cfg, data, plan, accelerator)
    eval_loader = None
    if data.eval is not None:
        eval_loader = loader(cfg, eval_stream(cfg, data.eval, accelerator.process_index, accelerator.num_processes))
    logger = MetricsLogger(accelerator, cfg, run_dir)
    last_update = min(plan.total_updates, cfg.train.max_updates or plan.total_updates)
    progress = Progress(last_update, state.update, enabled=accelerator.is_main_process and cfg.logging.progress)
    if accelerator.is_main_process:
        progress.write(_plan_line(plan, cfg, run_dir, checkpoint))

    started = time.perf_counter()
    eval_metrics: dict[str, float] = {}
    evaluated_at = saved_at = -1
    window = _Window()
    model.train()
    while state.update < last_update:
        stream.set_position(state.epoch, state.batch_in_epoch)
        for batch in loader(cfg, stream):
            images, labels = to_device(batch)
            with accelerator.accumulate(model):
                loss = criterion(model(images), labels)
                accelerator.backward(loss)
                state.batch_in_epoch += 1
                window.loss_sum += loss.detach()  # stays on the device: no host sync per step
                window.micro_batches += 1
                if accelerator.sync_gradients:
                    log_now = (state.update + 1) % cfg.train.log_every == 0
                    grad_norm = None
                    if cfg.train.clip_grad_norm or log_now:
                        grad_norm = accelerator.clip_grad_norm_(
                            model.parameters(), cfg.train.clip_grad_norm or math.inf
                        )
                    lr = lr_at(state.update, plan, cfg.schedule)
                    _set_lr(optimizer, lr)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.update += 1
                    window.updates += 1
            if not accelerator.sync_gradients:
                continue
            if log_now:
                values = _train_metrics(accelerator, window, plan, lr, grad_norm)
                logger.log(state.update, state.epoch, values)
                progress.update(
                    loss=f"{values['train/loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{values['train/images_per_s']:.0f}"
                )
                window.reset()
            else:
                progress.update()
            if state.update >= last_update:
                break

        if state.batch_in_epoch == plan.micro_batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if eval_loader is not None and state.epoch % cfg.eval.every_epochs == 0:
                eval_metrics = evaluate(model, eval_loader, to_device, accelerator)
                logger.log(state.update, state.epoch, eval_metrics)
                progress.write(_eval_line(state, eval_metrics))
                evaluated_at = state.update
            if state.epoch % cfg.checkpoint.every_epochs == 0:
                save_checkpoint(accelerator, run_dir, state, cfg.checkpoint.keep_last)
                saved_at = state.update
            window.reset()

    if eval_loader is not None and evaluated_at != state.update:
        eval_metrics = evaluate(model, eval_loader, to_device, accelerator)
        logger.log(state.update, state.epoch, eval_metrics)
    if saved_at != state.update:
        save_checkpoint(accelerator, run_dir, state, cfg.checkpoint.keep_last)
    fingerprints = replica_fingerprints(model, accelerator)
    progress.close()
    logger.close()
    summary = {
        "run_dir": str(run_dir),
        "updates": state.update,
        "epoch": state.epoch,
        "seconds": time.perf_counter() - started,
        "world_size": accelerator.num_processes,
        "replica_fingerprints": fingerprints,
        **eval_metrics,
    }
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if any(f != fingerprints[0] for f in fingerprints):
            print(f"distrain: WARNING: model replicas differ across ranks: {fingerprints}", file=sys.stderr)
        print(_summary_line(summary), flush=True)
    return summary


def _train_metrics(
    accelerator: Accelerator, window: _Window, plan: BatchPlan, lr: float, grad_norm: torch.Tensor | None
) -> dict[str, float]:
    """Window metrics averaged over ranks (one all-reduce, at the same update on every rank)."""
    mean_loss = (window.loss_sum / max(window.micro_batches, 1)).float()
    values = {
        "train/loss": accelerator.reduce(mean_loss, reduction="mean").item(),
        "train/lr": lr,
        "train/images_per_s": window.updates * plan.global_batch / window.elapsed(),
    }
    if grad_norm is not None:
        values["train/grad_norm"] = float(grad_norm)
    return values


def _plan_line(plan: BatchPlan, cfg: Config, run_dir: Path, checkpoint: Path | None) -> str:
    start = f"resuming from {checkpoint}" if checkpoint else "starting"
    return (
        f"distrain: {start}: {plan.world_size} process(es) x {plan.per_device} x {plan.accumulation} accumulation "
        f"= global batch {plan.global_batch}; {plan.updates_per_epoch} updates/epoch x {plan.epochs} epochs; "
        f"peak LR {plan.peak_lr:.4g}; model {cfg.model.name}; run dir {run_dir}"
    )


def _eval_line(state: TrainerState, m: dict[str, float]) -> str:
    return (
        f"epoch {state.epoch} update {state.update}: eval top-1 {m['eval/top1']:.2f}% top-5 {m['eval/top5']:.2f}% "
        f"loss {m['eval/loss']:.4f} ({m['eval/samples']} samples)"
    )


def _summary_line(s: dict) -> str:
    top1 = f"eval top-1 {s['eval/top1']:.2f}% on {s['eval/samples']} samples" if "eval/top1" in s else "no eval set"
    return f"distrain: done: {s['updates']} updates, {s['epoch']} epochs in {s['seconds']:.0f}s; {top1}; run dir {s['run_dir']}"
