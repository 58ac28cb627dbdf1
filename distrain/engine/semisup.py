"""Semi-supervised training with label propagation (Iscen et al. 2019) as a phase objective, on N ranks
and streamed shards.

A propagation runs before the phase's first update and then every ``lp.every_epochs`` epochs, at
the start of the epoch (:meth:`LabelPropagation.start_epoch`):

1. **Features, each sample once.** Every rank runs the model, in eval mode, over its slice of the
   *training* shards with eval preprocessing (an eval stream: contiguous slices, padded to equal
   batches), keeping the classifier's input, L2-normalised. Features, labels (-2 where unlabeled)
   and withheld labels are all-gathered, the keys with ``gather_object``; padding and unreadable
   positions are dropped. Every rank then holds the same N rows in shard order.
2. **Graph, rows split.** Rank r searches the exact ``k`` nearest neighbours of its N / ranks rows
   against all N (a blocked matrix product, on the device); the rows are all-gathered.
3. **Diffusion, classes split.** Every rank builds the same sparse normalised affinity; rank r
   solves the conjugate-gradient systems of classes r, r + ranks, ...; the columns are
   all-gathered.
4. **Pseudo-labels.** Computed from the gathered scores, then broadcast from rank 0, so every rank
   holds them bit for bit. They go to the training stream as a :class:`KeyedTargets` table: the
   workers look each unlabeled sample's pseudo-label and weight up by key.

The loss is the reference code's: per-sample cross-entropy with the class weights, times the
sample's weight, summed and divided by the micro-batch size. Labeled samples keep their labels at
weight 1.

The pseudo-labels in force (keys, labels, weights, class weights and the epoch they were made at)
are checkpoint state (``lp_targets.safetensors``), so a resumed run trains on exactly the targets
the interrupted one did; a run resumed at an epoch where a propagation is due makes it from the
checkpoint's weights, as the interrupted run did.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from distrain.config import Config
from distrain.data.device import ToDevice, prefetch_to_device
from distrain.data.shards import split_evenly
from distrain.data.stream import PAD_LABEL, KeyedTargets, ShardStream
from distrain.engine.objective import Classification
from distrain.errors import DistrainError
from distrain.models.pretrained import classifier_names
from distrain.parallel.setup import broadcast_from_main
from distrain.tricks.lp import PseudoLabels, diffuse, knn_rows, normalized_affinity, pseudo_labels

STATE = "lp_targets"
"""The checkpoint extra holding the pseudo-labels in force."""


def check_label_propagation(cfg: Config) -> None:
    """Refuse what a label-propagation phase cannot do, naming the key and why.

    Raises:
        DistrainError: out-of-range ``lp.*`` values, or a technique that replaces or mixes the
            targets (MixUp/CutMix, distillation, ``loss.*``, resampling by class, SSL, FixRes).
    """
    lp = cfg.lp
    if not lp.enabled:
        return
    for key, v in (("lp.every_epochs", lp.every_epochs), ("lp.k", lp.k), ("lp.cg_iters", lp.cg_iters),
                   ("lp.block", lp.block), ("lp.power", lp.power)):
        if v <= 0:
            raise DistrainError(f"{key}: must be > 0, got {v}")
    if not 0 <= lp.labeled_share < 1:
        raise DistrainError(f"lp.labeled_share: must be in [0, 1) (0 keeps the data's own share), got {lp.labeled_share}")
    if not 0 < lp.alpha < 1:
        raise DistrainError(f"lp.alpha: must be in (0, 1) (I - alpha S is then positive definite), got {lp.alpha}")
    refused = {
        "ssl.method": cfg.ssl.method != "none", "mix.mixup_alpha": cfg.mix.mixup_alpha,
        "mix.cutmix_alpha": cfg.mix.cutmix_alpha, "distill.teacher": cfg.distill.teacher,
        "loss.class_weights": cfg.loss.class_weights != "none", "loss.focal_gamma": cfg.loss.focal_gamma,
        "loss.logit_adjust_tau": cfg.loss.logit_adjust_tau, "data.resample": cfg.data.resample != "none",
        "fixres.epochs": cfg.fixres.epochs,
    }
    for key, on in refused.items():
        if on:
            raise DistrainError(f"{key}: cannot be combined with lp.enabled, which sets each sample's target and "
                                "weight from the propagation (use it in another phase)")


class LabelPropagation(Classification):
    """The objective of a label-propagation phase (see the module docstring).

    Args:
        cfg: The phase's config.
        num_classes: Classes of the data.
        plan, batch_copies: As :class:`~distrain.engine.objective.Classification`.
        features_loader: A loader over the training shards with eval preprocessing that keeps
            unlabeled samples (``require_labels=False``).
        accelerator: The run's Accelerator.
    """

    def __init__(self, cfg: Config, num_classes: int, plan, batch_copies: int, features_loader,
                 accelerator: Accelerator):
        super().__init__(cfg, num_classes, plan, batch_copies)
        self.features_loader, self.accelerator = features_loader, accelerator
        self.keys: list[str] = []
        self.targets: PseudoLabels | None = None
        self.made_at = -1  # the epoch whose start made the targets in force
        self.class_weights = torch.ones(num_classes, device=accelerator.device)

    def start_epoch(self, epoch: int, model: nn.Module, stream: ShardStream, to_device: ToDevice) -> dict[str, float]:
        """Propagate when one is due at ``epoch`` and not made yet, and give the stream the targets.

        Returns:
            The propagation's metrics (``lp/...``), empty when none ran.
        """
        metrics = {}
        due = epoch - epoch % self.cfg.lp.every_epochs
        if self.made_at != due:
            metrics = self.propagate(model, to_device)
            self.made_at = due
        stream.set_targets(KeyedTargets(self.keys, self.targets.labels, self.targets.weights))
        return metrics

    @torch.no_grad()
    def features(self, model: nn.Module, to_device: ToDevice) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list]:
        """Every training sample's L2-normalised features, label and withheld label, and key, once
        each and in shard order, the same on every rank (padding and bad positions dropped)."""
        acc = self.accelerator
        head = acc.unwrap_model(model).get_submodule(classifier_names(acc.unwrap_model(model))[0].rsplit(".", 1)[0])
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        was_training = model.training
        model.eval()
        feats, labels, withheld, keys = [], [], [], []
        try:
            for batch, images, y in prefetch_to_device(self.features_loader, to_device):
                model(images)
                feats.append(F.normalize(captured.pop().float().flatten(1), dim=1))
                labels.append(y)
                withheld.append(batch["withheld"].to(y.device))
                keys += batch["key"]
        finally:
            hook.remove()
            model.train(was_training)
        feats, labels, withheld = (acc.gather(torch.cat(t)) for t in (feats, labels, withheld))
        keys = gather_object(keys) if acc.num_processes > 1 else keys
        keep = (labels != PAD_LABEL).cpu()
        labels, withheld = labels.cpu()[keep].numpy(), withheld.cpu()[keep].numpy()
        return feats[keep.to(feats.device)], labels, withheld, [k for k, m in zip(keys, keep.tolist()) if m]

    def propagate(self, model: nn.Module, to_device: ToDevice) -> dict[str, float]:
        """Extract, build the graph, diffuse and derive the targets, the work split over the ranks."""
        lp, acc = self.cfg.lp, self.accelerator
        started = time.perf_counter()
        feats, labels, withheld, keys = self.features(model, to_device)
        n, c = len(keys), self.num_classes
        if n < 2:
            raise DistrainError(f"lp: {n} readable training sample(s); label propagation needs a graph")
        if not (labels >= 0).any():
            raise DistrainError(f"{self.cfg.data.train}: no labeled sample (with a .cls) to propagate from")
        ranks, rank = acc.num_processes, acc.process_index
        lo, hi = split_evenly(n, ranks, rank)
        sims, idx = knn_rows(feats, min(lp.k, n - 1), lo, hi, lp.block)
        rows = math.ceil(n / ranks)
        sims, idx = (_gather_rows(t, rows, n, acc) for t in (sims, idx))
        s = normalized_affinity(sims.numpy(), idx.numpy(), lp.power)
        mine = range(rank, c, ranks)
        z = torch.zeros(math.ceil(c / ranks), n, dtype=torch.float64)
        z[:len(mine)] = torch.from_numpy(diffuse(s, labels, mine, lp.alpha, lp.cg_iters).T)
        z = acc.gather(z.to(acc.device)).cpu().view(ranks, -1, n)
        scores = np.empty((n, c))
        for r in range(ranks):
            classes = range(r, c, ranks)
            scores[:, classes.start:c:ranks] = z[r, :len(classes)].T.numpy()
        made = pseudo_labels(scores, labels)
        shared = [torch.from_numpy(a).to(acc.device) for a in made]
        broadcast_from_main(shared, acc)  # the same targets on every rank, bit for bit
        self.targets = PseudoLabels(*(t.cpu().numpy() for t in shared))
        self.keys = keys
        self._use_class_weights()
        unlabeled = labels < 0
        measured = unlabeled & (withheld >= 0)
        metrics = {"lp/labeled": int((~unlabeled).sum()), "lp/unlabeled": int(unlabeled.sum()),
                   "lp/mean_weight": float(self.targets.weights[unlabeled].mean()) if unlabeled.any() else 1.0,
                   "lp/seconds": time.perf_counter() - started}
        if measured.any():
            metrics["lp/pseudo_top1"] = 100 * float((self.targets.labels[measured] == withheld[measured]).mean())
        return metrics

    def _use_class_weights(self) -> None:
        if self.cfg.lp.class_weights:
            self.class_weights = torch.from_numpy(self.targets.class_weights).to(self.accelerator.device)

    def targets_of(self, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, weights): the stream looked the pseudo-labels and weights up by key."""
        return labels, batch["weight"].to(labels.device, non_blocking=True)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Sum over the micro-batch of weight x class-weighted cross-entropy, divided by its size."""
        labels, weights = targets
        per_sample = F.cross_entropy(model(images).float(), labels.clamp(min=0), weight=self.class_weights,
                                     reduction="none", label_smoothing=self.cfg.train.label_smoothing)
        return (per_sample * weights).sum() / labels.shape[0]

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The targets in force, the keys as newline-separated UTF-8 bytes (a tensor, like the rest)."""
        if self.targets is None:
            return {STATE: {}}
        return {STATE: {
            "keys": torch.frombuffer(bytearray("\n".join(self.keys).encode()), dtype=torch.uint8),
            "labels": torch.from_numpy(self.targets.labels), "weights": torch.from_numpy(self.targets.weights),
            "class_weights": torch.from_numpy(self.targets.class_weights),
            "made_at": torch.tensor([self.made_at], dtype=torch.int64),
        }}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore the targets :meth:`state_dict` saved."""
        saved = state[STATE]
        if not saved:
            return
        self.keys = bytes(saved["keys"].cpu().numpy()).decode().split("\n")
        self.targets = PseudoLabels(*(saved[k].cpu().numpy() for k in ("labels", "weights", "class_weights")))
        self.made_at = int(saved["made_at"][0])
        self._use_class_weights()


def _gather_rows(t: torch.Tensor, rows: int, n: int, accelerator: Accelerator) -> torch.Tensor:
    """Rank r's rows ``split_evenly(n, ranks, r)`` of a row-split result, all-gathered in order."""
    padded = torch.zeros(rows, *t.shape[1:], dtype=t.dtype, device=accelerator.device)
    padded[:t.shape[0]] = t
    every = accelerator.gather(padded).cpu()
    return torch.cat([every[r * rows:r * rows + (hi - lo)]
                      for r, (lo, hi) in enumerate(split_evenly(n, accelerator.num_processes, r)
                                                   for r in range(accelerator.num_processes))])
