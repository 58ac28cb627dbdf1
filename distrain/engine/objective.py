"""What a phase trains: its model, what a micro-batch becomes on the device, its loss, its training
mode and its evaluation.

The loop (:mod:`distrain.engine.loop`) owns updates, accumulation, schedules, checkpoints and
signals; it calls the phase's objective at these points:

- ``build_model()``: once, before wrapping: the unwrapped model, weights loaded and what must not
  train frozen;
- ``start_epoch(epoch, model, stream, to_device)``: before the training stream (re)starts in an
  epoch: label propagation makes its pseudo-labels here and hands them to the stream;
- ``train_mode(wrapper, model, epoch)``: before each update (``epoch`` fractional: frozen blocks
  unfreeze at their epoch);
- ``targets_of(batch, labels)``: a micro-batch's targets from the host batch and its labels on the
  device (label propagation adds the stream's per-sample weights);
- ``augment(images, targets, seed)``: each micro-batch's device-side augmentation, drawn from the
  rank's per-micro-batch seeds (see :mod:`distrain.parallel.rng`);
- ``loss(model, images, targets)``: the micro-batch's loss;
- ``evaluate(model, loader, to_device, accelerator)``: eval metrics, each sample counted once;
- ``after_update(model, update, total_updates)``: after each optimizer update that was applied
  (BYOL moves its EMA target here);
- ``state_dict()`` / ``load_state_dict(state)``: the objective's own tensors that must be identical
  on every rank (BYOL's target), saved as checkpoint extras by name and restored on resume.

:class:`Classification` is supervised training on labels (the main phase, fine-tuning, linear
probes, FixRes); :class:`Distillation` adds a frozen teacher's outputs to the labels; the
self-supervised objectives are in :mod:`distrain.engine.selfsup`, label propagation in
:mod:`distrain.engine.semisup`. Besides the
points above, an objective gives the loop ``start_metrics(...)`` (logged once when the phase starts)
and ``window_metrics(...)`` (merged into each logged training window).
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from distrain.config import Config
from distrain.data.device import ToDevice
from distrain.data.stream import PAD_LABEL
from distrain.engine.build import DataSets, build_model
from distrain.engine.evaluate import evaluate
from distrain.errors import DistrainError
from distrain.models.pretrained import LoadReport, load_pretrained
from distrain.parallel.deepspeed import input_dtype
from distrain.parallel.rng import Owner, host_generator, numpy_generator
from distrain.plan import BatchPlan
from distrain.tricks import imbalance
from distrain.tricks.distill import (
    TeacherView,
    combine,
    enable_distilled_training,
    hard_distill_loss,
    load_teacher,
    soft_distill_loss,
    split_heads,
    teacher_fingerprint,
    valid_rows,
)
from distrain.tricks.erasing import apply_erasing, erasing_boxes
from distrain.tricks.fixres import freeze_for_fixres
from distrain.tricks.mix import MixCut
from distrain.tricks.transfer import freeze_for_linear_probe, gradual_train_mode, train_only, unfreeze_epochs


class Classification:
    """Supervised classification: cross-entropy on labels (label smoothing, MixUp/CutMix targets),
    with the class-imbalance terms of ``loss.*`` when any is on.

    Args:
        cfg: The phase's config.
        num_classes: Classes of the data set (the classifier's outputs).
        plan: The phase's batch plan.
        batch_copies: Adjacent copies of each sample in a micro-batch (repeated augmentation).
        fixres: This is a FixRes phase: only the classifier and the adapted norm layers train.
        frequencies: Samples of each class per epoch as trained (class weights, logit adjustment);
            None when the shard index has no class counts.
    """

    key_metric = "eval/top1"
    """What makes a checkpoint the best when early stopping does not say."""

    def __init__(self, cfg: Config, num_classes: int, plan: BatchPlan, batch_copies: int, fixres: bool = False,
                 frequencies: np.ndarray | None = None):
        self.cfg, self.num_classes, self.fixres = cfg, num_classes, fixres
        self.fingerprint = ""  # of the teacher's weights, checked on resume (Distillation)
        self.mixcut = _mixcut(cfg, num_classes, plan, batch_copies)
        self._imbalance = None
        if imbalance.enabled(cfg.loss):
            self._imbalance = imbalance.make_loss(cfg.loss, frequencies, cfg.train.label_smoothing, str(cfg.data.train))
            self._loss = self._imbalance
        else:
            # Label -1 marks a training batch the stream could not fill with any readable sample.
            self._loss = self.mixcut.loss if self.mixcut.enabled else nn.CrossEntropyLoss(
                label_smoothing=cfg.train.label_smoothing, ignore_index=PAD_LABEL)
        self._training: list[nn.Module] | None = None  # only these train (FixRes, linear probe); None: all
        self._unfreeze: dict[nn.Module, float] | None = None  # gradual unfreezing: module -> epoch
        self.load_report: LoadReport | None = None
        self.frozen_start: dict[str, torch.Tensor] = {}
        """The fp32 values of the frozen parameters: what the export writes for them (DeepSpeed
        16-bit keeps no fp32 master of a parameter that does not train)."""

    def build_model(self) -> nn.Module:
        """The model with its init, its pretrained weights (``model.pretrained``) and its frozen parts."""
        m = self.cfg.model
        model = build_model(self.cfg, self.num_classes)
        if m.pretrained:
            self.load_report = load_pretrained(model, m.pretrained, m.pretrained_ignore, m.reset_classifier)
        if self.fixres:
            self._training = freeze_for_fixres(model, self.cfg.fixres.adapt)
        elif self.cfg.transfer.mode == "linear_probe":
            self._training = freeze_for_linear_probe(model)
        elif self.cfg.transfer.mode == "gradual":
            self._unfreeze = unfreeze_epochs(model, self.cfg.transfer.unfreeze_every)
        self.frozen_start = {n: p.detach().float().clone() for n, p in model.named_parameters() if not p.requires_grad}
        return model

    def start_epoch(self, epoch: int, model: nn.Module, stream, to_device: ToDevice) -> dict[str, float]:
        """Called before the training stream (re)starts in ``epoch``; returns metrics to log (none here)."""
        return {}

    def targets_of(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        """A micro-batch's targets: its labels."""
        return labels

    def train_mode(self, wrapper: nn.Module, model: nn.Module, epoch: float) -> None:
        """Training mode, except for frozen layers, whose BN statistics, dropout and drop-path act
        as at test time.

        Args:
            wrapper: The prepared (DDP, DeepSpeed) model; ``model``: the module inside it.
            epoch: Where the coming update is, in epochs (gradual unfreezing, deferred re-weighting).
        """
        if self._imbalance is not None:
            self._imbalance.set_epoch(epoch)
        if self._training is not None:
            train_only(wrapper, model, self._training)
        elif self._unfreeze is not None:
            gradual_train_mode(wrapper, self._unfreeze, epoch)
        else:
            wrapper.train()

    def augment(self, images: torch.Tensor, targets: torch.Tensor, seed) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Random erasing, then MixUp/CutMix, with this rank's draws for this micro-batch.

        Args:
            seed: ``seed(owner)`` gives the micro-batch seed of each owner (see :mod:`distrain.parallel.rng`).

        Returns:
            (images, targets: int labels or soft targets when mixing is on, what was drawn).
        """
        drawn: dict = {}
        erasing = self.cfg.data.random_erasing
        if erasing:
            boxes = erasing_boxes(images.shape[0], *images.shape[-2:], erasing, host_generator(seed(Owner.ERASE)))
            images = apply_erasing(images, boxes)
            drawn["erased"] = [k for k, box in enumerate(boxes) if box is not None]
        if self.mixcut.enabled:
            images, targets, drawn["mix"] = self.mixcut(images, targets, numpy_generator(seed(Owner.MIX)))
        return images, targets, drawn

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(model(images), targets)

    def evaluate(self, model: nn.Module, loader, to_device: ToDevice, accelerator: Accelerator) -> dict[str, float]:
        return evaluate(model, loader, to_device, accelerator)

    def export_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the export writes of the model's weights: all of them."""
        return state

    def start_metrics(self, model: nn.Module, loader, to_device: ToDevice, accelerator: Accelerator
                      ) -> dict[str, float]:
        """Metrics to log once as the phase starts (none for plain classification)."""
        return {}

    def window_metrics(self, micro_batches: int, accelerator: Accelerator) -> dict[str, float]:
        """Metrics of the training window since the last log, averaged over ranks (none here)."""
        return {}

    def after_update(self, model: nn.Module, update: int, total_updates: int) -> None:
        """Called after optimizer update ``update`` (1-based) of ``total_updates`` with the unwrapped
        model; nothing here."""

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensor sets to checkpoint beside the model, by name, replicated on every rank (none here)."""
        return {}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`state_dict` output (nothing here)."""


class Distillation(Classification):
    """Classification plus a frozen teacher: loss = (1 - alpha) x label loss + alpha x distillation loss.

    The teacher is replicated on every rank, in the run's precision, outside the student: never
    wrapped in DDP, never given to DeepSpeed (under ZeRO-3 too: its forward then runs no collective,
    so no rank can wait for another inside it; it costs the teacher's memory on every device). It
    sees exactly the micro-batch the student sees, after erasing and MixUp/CutMix (Beyer et al.
    2022's consistent teaching): under hard distillation with mixing, the target is the teacher's
    top-1 class for the mixed image. A timm distilled DeiT student learns from the labels on its
    class head and from the teacher on its distillation head; eval averages the two (DeiT).

    Args:
        accelerator: The run's Accelerator: the teacher's device, dtype and autocast.
        Others: as :class:`Classification`.
    """

    def __init__(self, cfg: Config, num_classes: int, plan: BatchPlan, batch_copies: int, accelerator: Accelerator,
                 fixres: bool = False, frequencies: np.ndarray | None = None):
        super().__init__(cfg, num_classes, plan, batch_copies, fixres, frequencies)
        d, self.accelerator = cfg.distill, accelerator
        teacher = load_teacher(d.teacher, num_classes, accelerator.device, input_dtype(accelerator),
                               d.teacher_model, d.teacher_kwargs)
        if cfg.model.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        self.teacher = TeacherView(teacher, cfg.data.mean, cfg.data.std, d.teacher_mean, d.teacher_std,
                                   d.teacher_resolution)
        self.fingerprint = teacher_fingerprint(d.teacher)
        self._parts = torch.zeros(2, device=accelerator.device)  # label and distillation loss sums

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if self.cfg.distill.alpha > 0:  # at 0 DeiT's distillation head would get no gradient (DDP refuses)
            enable_distilled_training(model)
        return model

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        d = self.cfg.distill
        class_logits, distill_logits = split_heads(model(images))  # the same tensor for one-head students
        label = self._loss(class_logits, targets)
        with self.accelerator.autocast():  # the student's forward runs under it through prepare()
            teacher_logits = self.teacher(images)
        rows = valid_rows(targets)
        if d.kind == "soft":
            distill = soft_distill_loss(distill_logits, teacher_logits, d.temperature, rows)
        else:
            distill = hard_distill_loss(distill_logits, teacher_logits, self.cfg.train.label_smoothing, rows)
        self._parts += torch.stack([label.detach().float(), distill.detach().float()])
        return combine(label, distill, d.alpha)

    def evaluate(self, model: nn.Module, loader, to_device: ToDevice, accelerator: Accelerator) -> dict[str, float]:
        return evaluate(model, loader, to_device, accelerator, reference=self.teacher)

    def start_metrics(self, model: nn.Module, loader, to_device: ToDevice, accelerator: Accelerator
                      ) -> dict[str, float]:
        """The teacher's own eval metrics (``teacher/top1``...): a wrong teacher shows before hours are spent."""
        if loader is None:
            return {}
        metrics = evaluate(self.teacher, loader, to_device, accelerator)
        return {k.replace("eval/", "teacher/"): v for k, v in metrics.items() if k != "eval/skipped"}

    def window_metrics(self, micro_batches: int, accelerator: Accelerator) -> dict[str, float]:
        label, distill = accelerator.reduce(self._parts / max(micro_batches, 1), reduction="mean").tolist()
        self._parts.zero_()
        return {"train/loss_label": label, "train/loss_distill": distill}


def _mixcut(cfg: Config, num_classes: int, plan: BatchPlan, copies: int) -> MixCut:
    """The run's MixUp/CutMix, pairing each image with a partner that is not one of its own copies.

    Raises:
        DistrainError: mixing is on but every micro-batch holds copies of a single sample.
    """
    m = cfg.mix
    mixcut = MixCut(num_classes, m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, cfg.train.label_smoothing,
                    partner_shift=copies)
    if mixcut.enabled and plan.per_device <= copies:
        raise DistrainError(
            f"mix: each micro-batch of {plan.per_device} holds {copies} copies of one sample (data.repeats on "
            f"{plan.world_size} rank(s)), so every image would be mixed with its own copy; raise batch.per_device"
        )
    return mixcut


def make_objective(cfg: Config, data: DataSets, plan: BatchPlan, batch_copies: int, accelerator: Accelerator,
                   fixres: bool = False):
    """The phase's objective: self-supervised under ``ssl.method``, label propagation under
    ``lp.enabled``, distillation when ``distill.teacher`` is set, else classification.

    Args:
        data: The phase's data sets: classes, class frequencies (``loss.*``), the training shards
            (the SSL kNN monitor's bank, label propagation's features).
    """
    if cfg.lp.enabled:
        from distrain.engine.build import eval_stream, loader
        from distrain.engine.semisup import LabelPropagation

        every = loader(cfg, eval_stream(cfg, data.train, accelerator.process_index, accelerator.num_processes,
                                        data.num_classes, require_labels=False))
        return LabelPropagation(cfg, data.num_classes, plan, batch_copies, every, accelerator)
    if cfg.ssl.method != "none":
        from distrain.engine.build import eval_stream, loader
        from distrain.engine.selfsup import BYOL, SimCLR

        bank = None
        if data.eval is not None:
            bank = loader(cfg, eval_stream(cfg, data.train, accelerator.process_index, accelerator.num_processes,
                                           data.num_classes))
        if cfg.ssl.method == "byol":
            return BYOL(cfg, data.num_classes, accelerator, bank)
        return SimCLR(cfg, data.num_classes, bank)
    frequencies = data.class_frequencies()
    if cfg.distill.teacher:
        return Distillation(cfg, data.num_classes, plan, batch_copies, accelerator, fixres, frequencies)
    return Classification(cfg, data.num_classes, plan, batch_copies, fixres, frequencies)
