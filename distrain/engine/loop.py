"""The training loop: read this file top to bottom to know what a distrain run does.

Vocabulary: a *micro-batch* is what one device runs forward/backward on; an *update* is one
optimizer step, made every ``batch.accumulation`` micro-batches with gradients averaged over all
ranks; every schedule (LR, logging, checkpoints) counts updates. The batch maths come from
:mod:`distrain.plan` and nowhere else.

A run is a chain of phases (:mod:`distrain.engine.phases`: the main schedule, then FixRes; or the
recipe's ``phases``), each in its own run dir, each starting from the previous one's export. The
split of work inside a phase:

- this loop owns updates, accumulation, LR schedules, EMA, checkpoints, evaluation cadence,
  early stopping, signals and faults;
- the phase's objective (:mod:`distrain.engine.objective`) owns what is trained: it builds the
  model, turns a micro-batch into augmented inputs and targets, computes the loss, sets the
  training mode of frozen parts and evaluates.

Faults end a run through exceptions that every rank raises at the same update (see
:mod:`distrain.errors` for their exit codes): a preemption signal, too many bad samples, a
non-finite gradient under the ``stop`` policy, or a lost peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from safetensors.torch import save_file
from torch import nn

from distrain.config import Config, dump, to_dict
from distrain.data.device import ToDevice, prefetch_to_device
from distrain.engine.build import (
    check_remote_shards,
    eval_stream,
    loader,
    prepare_builtin,
    resolve_data,
    train_stream,
)
from distrain.engine.objective import Classification, make_objective
from distrain.engine.phases import Phase, chain, resume_point
from distrain.engine.step import finish_update, micro_batch
from distrain.errors import BadDataError, DistrainError, NonFiniteStop, PeerLost, Preempted, RunStopped
from distrain.models.factory import model_summary
from distrain.models.norms import check_norm_runtime
from distrain.optim import create_optimizer, lr_at
from distrain.parallel import build_accelerator
from distrain.parallel.deepspeed import fill_deepspeed_batch, input_dtype, is_partitioned, master_weights
from distrain.parallel.rng import Owner, micro_batch_seed, seed_layers
from distrain.parallel.setup import (
    broadcast_from_main,
    decided_by_main,
    replica_fingerprints,
    shutdown,
    sync_buffers,
)
from distrain.parallel.signals import StopSignals, agree, is_peer_failure, requeue_slurm_job
from distrain.plan import BatchPlan, make_plan
from distrain.track.checkpoint import (
    TrainerState,
    best_checkpoint,
    checkpoint_at,
    checkpoint_dirs,
    load_extra,
    load_trainer_state,
    rescale_position,
    resolve_resume,
    resume_differences,
    save_checkpoint,
)
from distrain.track.confusion import EVAL_DIR, plot_confusion, write_confusion
from distrain.track.draws import DrawLog
from distrain.track.lock import RunLock
from distrain.track.metrics import MetricsLogger
from distrain.track.progress import Progress
from distrain.track.safeload import check_checkpoint, refusing_pickled_code
from distrain.tricks.early_stopping import EarlyStopping
from distrain.tricks.ema import EMA
from distrain.tricks.progressive import train_size


class _Window:
    """Training loss and throughput since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.micro_batches, self.updates, self.start = 0, 0, time.perf_counter()

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def _start_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    run_dir = cfg.out_dir
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump(cfg))
    accelerator.wait_for_everyone()
    return run_dir


def _injected_nan_updates(rank: int) -> set[int]:
    """Updates (1-based) whose loss this rank makes NaN: fault injection for tests and drills.

    ``DISTRAIN_INJECT_NAN="5,9"`` poisons updates 5 and 9 on every rank, ``"5@1"`` on rank 1 only.
    """
    chosen = set()
    for item in filter(None, os.environ.get("DISTRAIN_INJECT_NAN", "").split(",")):
        update, _, only_rank = item.partition("@")
        if not only_rank or int(only_rank) == rank:
            chosen.add(int(update))
    return chosen


def train(cfg: Config, resume: str | None = None, allow_config_change: bool = False) -> dict:
    """Run the training described by ``cfg``, phase after phase; every rank calls this.

    Args:
        cfg: The validated config.
        resume: ``"auto"`` (newest checkpoint of the run dir, if any) or a checkpoint path; the
            chain continues in the phase that holds it.
        allow_config_change: Resume even if settings that decide the data, augmentation, loss or LR differ
            from the checkpoint's (see ``resume_differences``).

    Returns:
        The final phase's summary: run dir, updates, epochs, the last eval metrics.

    Raises:
        Preempted, NonFiniteStop, BadDataError, PeerLost: the run stopped early (see their exit codes).
    """
    accelerator = build_accelerator(cfg)
    lock = RunLock(cfg.out_dir)  # one live run per run dir; later phases write inside it, under this lock
    signals = StopSignals().install()
    summaries = []
    try:
        lock.acquire_for_run(accelerator)
        phases = chain(cfg)
        first, step_offset = decided_by_main(accelerator, lambda: resume_point(phases, resume))
        for i, phase in enumerate(phases[first:], first):
            accelerator.free_memory()  # drop the previous phase's prepared model and optimizer
            # Later phases start afresh: checkpoints of theirs would come from an older start.
            phase_resume = resume if i == first else None
            summaries.append(_train(phase, accelerator, signals, phase_resume, allow_config_change, step_offset,
                                    cfg.out_dir))
            step_offset += summaries[-1]["updates"]
    except Exception as error:
        ending = error
        if not isinstance(error, RunStopped) and accelerator.num_processes > 1 and is_peer_failure(error):
            newest = checkpoint_dirs(cfg.out_dir)
            ending = PeerLost(
                f"rank {accelerator.process_index}: lost contact with another rank, which died or hung past "
                f"distributed.timeout_s={cfg.distributed.timeout_s}s ({str(error).splitlines()[0][:200]}); "
                f"newest checkpoint: {newest[-1] if newest else 'none'}; continue with --resume auto"
            )
        # A run stopped on purpose is on its way out with its checkpoint written: a repeated SIGTERM
        # from the scheduler must not turn its exit code into a kill.
        if isinstance(ending, RunStopped):
            signals.ignore_further()
        shutdown(accelerator)
        lock.release()
        if not isinstance(ending, RunStopped):
            signals.restore()
        if ending is error:
            raise
        raise ending from None
    shutdown(accelerator)
    lock.release()
    signals.restore()
    if accelerator.is_main_process:
        for summary in summaries:  # last, after W&B's own closing lines
            print(_summary_line(summary), flush=True)
    return summaries[-1]


class _Run:
    """One phase's prepared model, optimizer and EMA with its position: what the loop does between
    updates (synchronise, evaluate, checkpoint, export)."""

    def __init__(self, cfg: Config, accelerator: Accelerator, model: nn.Module, optimizer, ema: EMA | None,
                 state: TrainerState, objective: Classification, to_device: ToDevice, eval_loader,
                 eval_classes: tuple[str, ...] = ()):
        self.cfg, self.accelerator, self.model, self.optimizer, self.ema = cfg, accelerator, model, optimizer, ema
        self.eval_classes = eval_classes
        self.unwrapped = accelerator.unwrap_model(model)
        self.state, self.objective, self.to_device, self.eval_loader = state, objective, to_device, eval_loader
        es = cfg.early_stopping
        self.by_stopper = bool(es.patience or es.restore_best)
        if not self.by_stopper:  # it still counts, on the objective's own metric (SSL: the kNN monitor's)
            es = dataclasses.replace(es, metric=objective.key_metric, mode="max")
        self.stopper = EarlyStopping.from_config(es)  # counts even without patience: restore_best needs its best
        self.stopper.load_state_dict(state.early_stopping)

    def best_by(self) -> tuple[str, str, int | None]:
        """What the best checkpoint is: early stopping's best (its metric, mode and best update) when
        it is on, else the highest eval/top1."""
        if not self.by_stopper:
            return (self.objective.key_metric, "max", None)
        es = self.cfg.early_stopping
        return (es.metric, es.mode, self.stopper.best_update)

    def best(self) -> Path | None:
        return best_checkpoint(self.cfg.out_dir, *self.best_by())

    def sync_state(self) -> None:
        """Rank 0's buffers become every rank's, for the raw and the EMA weights (see sync_buffers)."""
        sync_buffers(self.model, self.accelerator)
        if self.ema is not None:
            broadcast_from_main(self.ema.buffers(), self.accelerator)

    def save(self) -> Path:
        self.sync_state()
        extras = {}
        if self.ema is not None:
            self.state.ema_updates, extras["ema"] = self.ema.n_updates, self.ema.shadow
        extras.update(self.objective.state_dict())  # BYOL: its target network
        self.state.early_stopping = self.stopper.state_dict()
        c = self.cfg.checkpoint
        return save_checkpoint(self.accelerator, self.cfg.out_dir, self.state, c.keep_last, c.keep_best, extras,
                               per_rank=is_partitioned(self.unwrapped), best=self.best_by())

    def restore_best(self) -> Path | None:
        """Load the best checkpoint's weights (and EMA) for the export (``early_stopping.restore_best``).

        Returns:
            The checkpoint, or None when the current weights are the best.
        """
        best = decided_by_main(self.accelerator, self.best)
        if best is None or best == checkpoint_at(self.cfg.out_dir, self.state.update):
            return None
        _load_checkpoint(self.accelerator, best, "early_stopping.restore_best", self.ema,
                         load_trainer_state(best).ema_updates, is_partitioned(self.unwrapped), self.objective)
        return best

    def evaluate(self) -> dict[str, float]:
        """The eval metrics (rank 0 also writes the confusion matrix to ``RUN_DIR/eval/``)."""
        self.sync_state()
        metrics = self.objective.evaluate(self.model, self.eval_loader, self.to_device, self.accelerator)
        if self.ema is not None:
            with self.ema.swapped(self.unwrapped):
                averaged = self.objective.evaluate(self.model, self.eval_loader, self.to_device, self.accelerator)
            for key in ("eval/top1", "eval/top5", "eval/loss", "eval/knn_top1"):
                if key in averaged:
                    metrics[key.replace("eval/", "eval/ema_")] = averaged[key]
        confusion = getattr(metrics, "confusion", None)
        if confusion is not None and self.accelerator.is_main_process:
            write_confusion(self.cfg.out_dir, self.state.update, self.state.epoch, metrics, confusion,
                            self.eval_classes)
        return metrics

    def export(self) -> None:
        """Write ``RUN_DIR/model.safetensors``: fp32 weights (EMA ones under ``ema.export``)."""
        self.sync_state()
        ema, unwrapped = self.ema if self.cfg.ema.export else None, self.unwrapped
        # Whole weights on every rank's call (a gather under ZeRO-3); rank 0 writes them.
        with ema.swapped(unwrapped) if ema is not None else contextlib.nullcontext():
            # Copies, taken inside the block: DDP's state dict holds the live tensors that the swap
            # restores. Under ZeRO-3 only rank 0 receives the gathered weights (others get None).
            export = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
                      for k, v in (self.accelerator.get_state_dict(self.model) or {}).items()}
        if ema is None:
            # DeepSpeed 16-bit: the fp32 masters. Frozen parameters have none; they are still the
            # fp32 values the phase started from.
            masters = master_weights(self.accelerator, unwrapped)
            if masters:
                masters.update({n: v for n, v in self.objective.frozen_start.items() if n not in masters})
            export.update(masters)
        if self.accelerator.is_main_process:
            # channels_last weights keep their strides through clone(); safetensors takes dense ones only.
            export = self.objective.export_weights(export)
            save_file({k: v.contiguous() for k, v in export.items()}, self.cfg.out_dir / "model.safetensors")

    def fingerprints(self) -> list[list[float]]:
        """Weights and (synchronised) buffers, raw and EMA, and the objective's state (BYOL's target),
        of every rank: they must all agree."""
        prints = replica_fingerprints(self.model, self.accelerator)
        if self.ema is not None:
            with self.ema.swapped(self.unwrapped):
                prints = [a + b for a, b in zip(prints, replica_fingerprints(self.model, self.accelerator))]
        for tensors in self.objective.state_dict().values():
            own = replica_fingerprints(nn.Module(), self.accelerator, tensors.values())
            prints = [a + b for a, b in zip(prints, own)]
        return prints


def _train(phase: Phase, accelerator: Accelerator, signals: StopSignals, resume: str | None, allow: bool,
           step_offset: int, wandb_dir: Path) -> dict:
    cfg = phase.cfg
    run_dir = _start_run_dir(cfg, accelerator)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    prepare_builtin(cfg, accelerator)
    data = resolve_data(cfg)
    check_remote_shards(data, accelerator)
    plan = make_plan(cfg, accelerator.num_processes, data.epoch_samples)
    accelerator.gradient_accumulation_steps = plan.accumulation
    if accelerator.state.deepspeed_plugin is not None:
        fill_deepspeed_batch(cfg, accelerator, plan)
    rank = accelerator.process_index
    stream = train_stream(cfg, data, plan, accelerator)
    objective = make_objective(cfg, data, plan, stream.batch_copies, accelerator, phase.fixres)

    check_norm_runtime(cfg.model.norm, accelerator.device)
    model = objective.build_model()
    # Before wrapping: counted on meta copies, so nothing of the model changes.
    described = model_summary(model, cfg.data.train_crop, cfg.model.name) if accelerator.is_main_process else ""
    optimizer = create_optimizer(model, cfg.optim, lr_at(0, plan, cfg.schedule), cfg.transfer)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, cfg.ema.decay, cfg.ema.every, cfg.ema.warmup) if cfg.ema.decay else None
    to_device = ToDevice(cfg.data.mean, cfg.data.std, accelerator.device, cfg.model.channels_last,
                         input_dtype(accelerator))

    # The precision that "auto" resolved to on this machine is what a resume must match.
    state = TrainerState(config=_with_resolved_precision(to_dict(cfg), accelerator), plan=plan.as_dict(),
                         teacher_sha256=objective.fingerprint)
    checkpoint = decided_by_main(accelerator, lambda: resolve_resume(resume, run_dir)) if resume else None
    if checkpoint is not None:
        state = _resume(accelerator, checkpoint, state, allow, ema, is_partitioned(unwrapped), objective)

    draws = DrawLog(run_dir, rank) if cfg.logging.draws else None
    eval_loader = None
    if data.eval is not None:
        eval_loader = loader(cfg, eval_stream(cfg, data.eval, rank, accelerator.num_processes, data.num_classes))
    run = _Run(cfg, accelerator, model, optimizer, ema, state, objective, to_device, eval_loader,
               (data.eval.classes or data.train.classes) if data.eval is not None else ())
    logger = MetricsLogger(accelerator, cfg, run_dir, phase.log_prefix, step_offset, wandb_dir)
    last_update = min(plan.total_updates, cfg.train.max_updates or plan.total_updates)
    progress = Progress(last_update, state.update, main=accelerator.is_main_process, bar=cfg.logging.progress)
    progress.write(_plan_line(plan, cfg, run_dir, checkpoint, phase))
    progress.write(f"distrain: model {described}")
    crowded = data.resampling.crowding(cfg.data.shuffle_block, plan.per_device) if data.resampling else ""
    if crowded:
        progress.write(f"distrain: warning: {crowded}")
    if objective.load_report is not None and checkpoint is None:
        progress.write(f"distrain: {objective.load_report}")
    started_with = objective.start_metrics(model, eval_loader, to_device, accelerator)
    if started_with:
        logger.log(state.update, state.epoch, started_with)
        progress.write("distrain: " + ", ".join(f"{k} {v:.2f}" for k, v in started_with.items() if k.endswith("top1")))

    started = time.perf_counter()
    eval_metrics: dict[str, float] = {}
    evaluated_at = saved_at = -1
    window = _Window()
    nan_updates = _injected_nan_updates(rank)
    check_nonfinite = accelerator.mixed_precision != "fp16"  # fp16's GradScaler skips inf steps itself
    new_bad: list[tuple[str, str, str]] = []  # this rank's bad samples since the last agreement
    consecutive_skips = 0
    try:
        while state.update < last_update and not run.stopper.stopped:
            stream.set_position(state.epoch, state.batch_in_epoch)
            stream.set_size(train_size(cfg, state.epoch))
            epoch_metrics = objective.start_epoch(state.epoch, model, stream, to_device)  # label propagation
            if epoch_metrics:
                logger.log(state.update, state.epoch, epoch_metrics)
                progress.write(f"distrain: epoch {state.epoch}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in epoch_metrics.items()))
            for batch, images, targets in prefetch_to_device(loader(cfg, stream), to_device):
                new_bad += batch["bad"]
                targets = objective.targets_of(batch, targets)
                micro = state.batch_in_epoch % plan.accumulation
                at_epoch = state.update / plan.updates_per_epoch
                if micro == 0:  # also undoes the eval mode an evaluation leaves
                    objective.train_mode(model, unwrapped, at_epoch)
                seed = functools.partial(micro_batch_seed, cfg.seed, rank, state.update, micro, phase=phase.index)
                seed_layers(accelerator.device, seed(Owner.LAYERS))  # dropout, drop-path
                images, targets, drawn = objective.augment(images, targets, seed)
                if draws is not None:
                    draws.write(state.update, micro, batch["key"], images, targets, drawn)
                with accelerator.accumulate(model):
                    loss, lr_set = micro_batch(accelerator, model, optimizer, objective.loss, images, targets,
                                               lambda: lr_at(state.update, plan, cfg.schedule),
                                               poison=state.update + 1 in nan_updates, epoch=at_epoch)
                    state.batch_in_epoch += 1
                    window.loss_sum += loss  # stays on the device: no host sync per step
                    window.micro_batches += 1
                    if accelerator.sync_gradients:
                        lr = lr_set
                        grad_norm, finite = finish_update(
                            accelerator, model, optimizer, cfg.train.clip_grad_norm, check_nonfinite, at_epoch
                        )
                        consecutive_skips = 0 if finite else consecutive_skips
                if not accelerator.sync_gradients:
                    continue

                if not finite:
                    consecutive_skips += 1
                    if cfg.train.nonfinite == "stop" or consecutive_skips > cfg.train.max_consecutive_skips:
                        # The parameters are those before this update: save them with the position rewound.
                        state.batch_in_epoch -= plan.accumulation
                        path = run.save()
                        raise NonFiniteStop(
                            f"rank {rank}: non-finite gradient norm at update {state.update + 1} "
                            f"({consecutive_skips} in a row); checkpoint of the last good state: {path}"
                        )
                    state.skipped_updates += 1
                state.update += 1
                if finite:
                    if ema is not None:
                        ema.update(unwrapped, state.update)
                    objective.after_update(unwrapped, state.update, plan.total_updates)  # BYOL: its target
                state.samples_seen += plan.global_batch
                window.updates += 1

                stop = False
                if state.update % cfg.preemption.check_every == 0:
                    agreed = agree(accelerator, signals.received is not None, len(new_bad))
                    state.bad_samples += agreed.bad_samples
                    _check_bad_data(cfg, plan, state, agreed.bad_samples, new_bad)
                    new_bad, stop = [], agreed.stop_ranks > 0
                if state.update % cfg.train.log_every == 0 or stop:
                    values = _train_metrics(accelerator, window, plan, lr, grad_norm, state, stream.augment.size)
                    values.update(objective.window_metrics(window.micro_batches, accelerator))
                    logger.log(state.update, state.epoch, values)
                    progress.update(
                        loss=f"{values['train/loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{values['train/images_per_s']:.0f}"
                    )
                    window.reset()
                else:
                    progress.update()
                if stop:
                    _preempt(cfg, accelerator, state, signals, run.save, progress)
                if state.update >= last_update:
                    break

            if state.batch_in_epoch == plan.micro_batches_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if eval_loader is not None and state.epoch % cfg.eval.every_epochs == 0:
                    eval_metrics = state.eval = run.evaluate()
                    logger.log(state.update, state.epoch, eval_metrics)
                    progress.write(_eval_line(state, eval_metrics))
                    evaluated_at = state.update
                    if run.stopper.update(eval_metrics, epoch=state.epoch, update=state.update):
                        progress.write(f"distrain: {run.stopper.reason}")
                if state.epoch % cfg.checkpoint.every_epochs == 0 or run.stopper.stopped:
                    run.save()
                    saved_at = state.update
                window.reset()

        if eval_loader is not None and evaluated_at != state.update:
            eval_metrics = state.eval = run.evaluate()
            logger.log(state.update, state.epoch, eval_metrics)
        confusion = getattr(eval_metrics, "confusion", None)
        if logger.has_wandb and confusion is not None:
            png = plot_confusion(confusion, run.eval_classes, cfg.out_dir / EVAL_DIR / "confusion.png",
                                 title=f"{cfg.name}: update {state.update}")
            logger.log_image(state.update, "eval/confusion", png)
        if saved_at != state.update:
            run.save()
        restored = run.restore_best() if cfg.early_stopping.restore_best else None
        if restored is not None:
            progress.write(f"distrain: exporting the best weights, from {restored}")
        run.export()
        fingerprints = run.fingerprints()
    finally:
        progress.close()
        if draws is not None:
            draws.close()

    return _write_summary(phase, run, time.perf_counter() - started, fingerprints, eval_metrics, restored)


def _write_summary(phase: Phase, run: _Run, seconds: float, fingerprints: list[list[float]],
                   eval_metrics: dict[str, float], restored: Path | None) -> dict:
    """The phase's ``summary.json`` (written by rank 0, the last thing a phase does) and its dict."""
    state, accelerator = run.state, run.accelerator
    summary = {
        "phase": phase.name,
        "run_dir": str(phase.cfg.out_dir),
        "updates": state.update,
        "epoch": state.epoch,
        "seconds": seconds,
        "world_size": accelerator.num_processes,
        # What `deterministic` switched on (cuDNN/cuBLAS flags follow it in build_accelerator).
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "data/skipped": state.bad_samples,
        "train/skipped_updates": state.skipped_updates,
        "best_checkpoint": str(run.best() or ""),
        "stopped_early": run.stopper.reason,
        "exported": str(restored or "last"),
        "replica_fingerprints": fingerprints,
        **eval_metrics,
    }
    if accelerator.is_main_process:
        (phase.cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if any(f != fingerprints[0] for f in fingerprints):
            print(f"distrain: WARNING: model replicas differ across ranks: {fingerprints}", file=sys.stderr)
    return summary


def _resume(
    accelerator: Accelerator, checkpoint: Path, fresh: TrainerState, allow: bool, ema: EMA | None, partitioned: bool,
    objective: Classification,
) -> TrainerState:
    """Load a checkpoint into the prepared model/optimizer and return the position to continue from.

    Raises:
        DistrainError: settings differ from the checkpoint's (see ``resume_differences``) and ``allow`` is off.
    """
    saved = load_trainer_state(checkpoint)
    diffs = resume_differences(saved, fresh.config, fresh.plan)
    if saved.teacher_sha256 != fresh.teacher_sha256:  # the same teacher path may hold other weights
        diffs.append(f"distill.teacher weights: sha256 {saved.teacher_sha256[:12] or 'none'} -> "
                     f"{fresh.teacher_sha256[:12] or 'none'}")
    if diffs and not allow:
        raise DistrainError(
            f"--resume {checkpoint}: settings differ from the checkpoint's ({'; '.join(diffs)}); "
            "pass --allow-config-change to resume anyway (not an exact continuation)"
        )
    _load_checkpoint(accelerator, checkpoint, "--resume", ema, saved.ema_updates, partitioned, objective)
    if any(d.startswith("plan ") for d in diffs):  # another batch plan: the position counts other batches
        saved.batch_in_epoch = rescale_position(saved, fresh.plan)
    saved.config, saved.plan, saved.teacher_sha256 = fresh.config, fresh.plan, fresh.teacher_sha256
    return saved


def _load_checkpoint(accelerator: Accelerator, checkpoint: Path, what: str, ema: EMA | None, ema_updates: int,
                     partitioned: bool, objective: Classification) -> None:
    """Load a checkpoint's model, optimizer and RNG states (and EMA, and the objective's state) on
    every rank, safely.

    Raises:
        DistrainError: naming ``what``: pickled code, or a truncated, foreign or mismatched file.
    """
    # Every rank learns of a file with pickled code before any rank waits in the load's collectives.
    check_checkpoint(checkpoint, what, accelerator.process_index, accelerator.num_processes)
    try:
        with refusing_pickled_code(what):
            accelerator.load_state(str(checkpoint))
    except (RuntimeError, OSError, KeyError) as error:
        # A truncated or foreign file, or another model's state (pickled code is a DistrainError).
        why = str(error).splitlines()[0][:200]
        raise DistrainError(f"{what} {checkpoint}: cannot load checkpoint ({why})") from None
    if ema is not None:
        rank = accelerator.process_index if partitioned else None  # ZeRO-3: each rank's own slice
        shadow = load_extra(checkpoint, "ema", accelerator.device, rank)
        ema.load_state_dict({"shadow": shadow, "n_updates": ema_updates})
    # Replicated, so rank 0's file (BYOL: byol_target.safetensors); objectives without state load nothing.
    objective.load_state_dict({name: load_extra(checkpoint, name, accelerator.device)
                               for name in objective.state_dict()})


def _with_resolved_precision(config: dict, accelerator: Accelerator) -> dict:
    """``config`` with ``train.precision`` as this run resolved it (bf16/fp16/fp32, never "auto")."""
    resolved = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    return {**config, "train": {**config["train"], "precision": resolved}}


def _check_bad_data(
    cfg: Config, plan: BatchPlan, state: TrainerState, new_total: int, mine: list[tuple[str, str, str]]
) -> None:
    """Stop every rank together when bad training samples exceed the policy.

    The limit is a fraction of the samples seen, but never less than that fraction of one epoch,
    so a bad sample early in the run does not stop it.

    Raises:
        BadDataError: naming a bad shard and key (gathered from whichever rank met one).
    """
    limit = cfg.data.max_bad_fraction * max(state.samples_seen, plan.samples_per_epoch)
    if not new_total or (cfg.data.bad_samples == "skip" and state.bad_samples <= limit):
        return
    seen = [entry for entries in gather_object([mine[:1]]) for entry in entries]
    url, key, reason = seen[0] if seen else ("?", "?", "?")
    why = "data.bad_samples is fail" if cfg.data.bad_samples == "fail" else (
        f"{state.bad_samples} bad of {state.samples_seen} samples seen exceeds data.max_bad_fraction="
        f"{cfg.data.max_bad_fraction}"
    )
    raise BadDataError(f"bad sample {key!r} in {url}: {reason} ({why}; stopped at update {state.update})")


def _preempt(cfg: Config, accelerator: Accelerator, state: TrainerState, signals: StopSignals, save, progress) -> None:
    """Checkpoint at this update (all ranks), optionally requeue the SLURM job, and stop.

    Raises:
        Preempted: always, on every rank.
    """
    cause = f"{signals.received} received" if signals.received else "a stop signal on another rank"
    path = save()
    job = os.environ.get("SLURM_JOB_ID")
    if cfg.preemption.requeue and job and accelerator.is_main_process:
        progress.write(f"distrain: requeue: {requeue_slurm_job(job)}")
    raise Preempted(
        f"rank {accelerator.process_index}: stopped at update {state.update} ({cause}); checkpoint {path}; "
        "continue with --resume auto"
    )


def _train_metrics(
    accelerator: Accelerator, window: _Window, plan: BatchPlan, lr: float, grad_norm: torch.Tensor,
    state: TrainerState, resolution: int,
) -> dict[str, float]:
    """Window metrics averaged over ranks (one all-reduce, at the same update on every rank)."""
    mean_loss = (window.loss_sum / max(window.micro_batches, 1)).float()
    return {
        "train/loss": accelerator.reduce(mean_loss, reduction="mean").item(),
        "train/lr": lr,
        "train/images_per_s": window.updates * plan.global_batch / window.elapsed(),
        "train/grad_norm": float(grad_norm),
        "train/skipped_updates": state.skipped_updates,
        "train/resolution": resolution,
        "data/skipped": state.bad_samples,
    }


def _plan_line(plan: BatchPlan, cfg: Config, run_dir: Path, checkpoint: Path | None, phase: Phase) -> str:
    start = f"resuming from {checkpoint}" if checkpoint else "starting"
    start += f" the {phase.name} phase" if phase.name != "main" else ""
    ds = AcceleratorState().deepspeed_plugin
    backend = f"DeepSpeed ZeRO-{ds.zero_stage}" if ds is not None else "DDP"
    return (
        f"distrain: {start}: {plan.world_size} process(es) x {plan.per_device} x {plan.accumulation} accumulation "
        f"= global batch {plan.global_batch}; {plan.updates_per_epoch} updates/epoch x {plan.epochs} epochs; "
        f"peak LR {plan.peak_lr:.4g}; model {cfg.model.name}; {backend}; run dir {run_dir}"
    )


def _eval_line(state: TrainerState, m: dict[str, float]) -> str:
    if "eval/knn_top1" in m:
        return (f"epoch {state.epoch} update {state.update}: eval kNN top-1 {m['eval/knn_top1']:.2f}% "
                f"({m['eval/samples']} samples)")
    ema = f", EMA top-1 {m['eval/ema_top1']:.2f}%" if "eval/ema_top1" in m else ""
    return (
        f"epoch {state.epoch} update {state.update}: eval top-1 {m['eval/top1']:.2f}% top-5 {m['eval/top5']:.2f}% "
        f"loss {m['eval/loss']:.4f} ({m['eval/samples']} samples){ema}"
    )


def _summary_line(s: dict) -> str:
    top1 = f"eval top-1 {s['eval/top1']:.2f}% on {s['eval/samples']} samples" if "eval/top1" in s else "no eval set"
    if "eval/knn_top1" in s:
        top1 = f"eval kNN top-1 {s['eval/knn_top1']:.2f}% on {s['eval/samples']} samples"
    skipped = f"; {s['data/skipped']} bad samples skipped" if s["data/skipped"] else ""
    phase = "" if s["phase"] == "main" else f" {s['phase']} phase"
    stopped = f"; {s['stopped_early']}" if s["stopped_early"] else ""
    return (
        f"distrain: done{phase}: {s['updates']} updates, {s['epoch']} epochs in {s['seconds']:.0f}s; {top1}{skipped}"
        f"{stopped}; run dir {s['run_dir']}"
    )
