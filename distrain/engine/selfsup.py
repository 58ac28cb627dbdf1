"""Self-supervised pretraining as a phase objective: SimCLR with negatives from every rank, BYOL with
an EMA target (see :class:`BYOL`), and a kNN monitor that counts every sample once.

The model is the configured network with its classifier replaced by an identity (so it outputs the
pooled features) under ``encoder``, followed by a projection MLP under ``projector``. Each training
batch holds two augmented views of each sample, made in the DataLoader workers and laid out view
by view (see :mod:`distrain.data.stream`). The loss is NT-Xent over the *global* batch: each rank's
anchors against the embeddings of every rank, gathered with a backward
(:func:`distrain.tricks.ssl.gather_with_grad`), so the negatives number 2 x global batch - 2 as in
SimCLR, not 2 x per-device batch - 2 as with a per-rank loss (lightly's ``NTXentLoss`` default).

Under gradient accumulation a micro-batch's negatives are those of the micro-batch on every rank:
the global micro-batch, not the whole update's batch. Batch norm normalises each rank's two views
together; SimCLR normalised over all devices (``model.norm: sync_batch`` on GPUs).

The export holds the backbone alone, under the network's own parameter names and without its
classifier, so the next phase loads it with ``model.pretrained`` (a phase after this one does so by
default, with its classifier re-initialised).

The kNN monitor (Wu et al. 2018) runs at every evaluation (and before the first update with
``ssl.knn_at_start``): each rank extracts the L2-normalised backbone features of its share of the
training shards (the bank) and of the eval shards, with eval preprocessing; the bank is gathered to
every rank, each rank classifies its eval samples by their ``k`` nearest bank samples weighted by
exp(similarity / T), and one all-reduce adds the hits. Unlabeled training samples are left out of
the bank.
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from torch import nn

from distrain.config import Config
from distrain.data.device import ToDevice, prefetch_to_device
from distrain.data.views import ViewAugment
from distrain.engine.build import build_model
from distrain.errors import DistrainError
from distrain.models.pretrained import classifier_names
from distrain.parallel.deepspeed import input_dtype
from distrain.tricks.ema import EMA
from distrain.tricks.ssl import byol_loss, cosine_ema_momentum, knn_predict, nt_xent

ENCODER, PROJECTOR = "encoder.", "projector."


class SSLModel(nn.Module):
    """A backbone that outputs pooled features, and the projection head SimCLR trains through.

    Args:
        encoder: The classification network with its classifier replaced by an identity.
        features: Width of the encoder's output.
        hidden: Hidden width of the projection MLP; dim: its output width.
    """

    def __init__(self, encoder: nn.Module, features: int, hidden: int, dim: int):
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images))


def strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace ``model``'s classifier (see :func:`classifier_names`) by an identity, in place.

    Returns:
        The model, now outputting the classifier's input features, and their width.

    Raises:
        DistrainError: the classifier is not a single linear layer.
    """
    path = classifier_names(model)[0].rsplit(".", 1)[0]
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = getattr(parent, leaf)
    if not isinstance(head, nn.Linear):
        raise DistrainError(f"ssl.method: the classifier of {type(model).__name__} ({path}) is not one linear layer")
    setattr(parent, leaf, nn.Identity())
    return model, head.in_features


def backbone_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The export of an :class:`SSLModel`: the encoder's tensors under the network's own names."""
    return {k[len(ENCODER):]: v for k, v in state.items() if k.startswith(ENCODER)}


def check_ssl(cfg: Config) -> None:
    """Refuse what a self-supervised phase cannot do, naming the key and why.

    Raises:
        DistrainError: label-based techniques (MixUp/CutMix, label smoothing, distillation, class
            weights, resampling, FixRes, transfer modes, repeated augmentation) with ``ssl.method``
            on, out-of-range SSL values, or BYOL under DeepSpeed ZeRO-3.
    """
    s = cfg.ssl
    if s.method == "none":
        return
    for key, v in (("ssl.temperature", s.temperature), ("ssl.proj_hidden", s.proj_hidden), ("ssl.proj_dim", s.proj_dim),
                   ("ssl.pred_hidden", s.pred_hidden), ("ssl.knn_k", s.knn_k),
                   ("ssl.knn_temperature", s.knn_temperature)):
        if v <= 0:
            raise DistrainError(f"{key}: must be > 0, got {v}")
    for key, v in (("ssl.blur_prob", s.blur_prob), ("ssl.solarize_prob", s.solarize_prob or 0.0)):
        if not 0 <= v <= 1:
            raise DistrainError(f"{key}: a probability in [0, 1], got {v}")
    if not 0 <= s.target_momentum < 1:
        raise DistrainError(f"ssl.target_momentum: must be in [0, 1), got {s.target_momentum}")
    if s.method == "byol" and cfg.distributed.backend == "deepspeed" and cfg.distributed.zero_stage == 3:
        raise DistrainError(ZERO3_REFUSAL)
    if not 0 <= s.color_strength <= 2.5:  # beyond, the hue shift would pass half the colour wheel
        raise DistrainError(f"ssl.color_strength: must be in [0, 2.5], got {s.color_strength}")
    labels = {
        "mix.mixup_alpha": cfg.mix.mixup_alpha, "mix.cutmix_alpha": cfg.mix.cutmix_alpha,
        "train.label_smoothing": cfg.train.label_smoothing, "distill.teacher": cfg.distill.teacher,
        "loss.class_weights": cfg.loss.class_weights != "none", "loss.focal_gamma": cfg.loss.focal_gamma,
        "loss.logit_adjust_tau": cfg.loss.logit_adjust_tau, "data.resample": cfg.data.resample != "none",
        "fixres.epochs": cfg.fixres.epochs, "data.random_erasing": cfg.data.random_erasing,
    }
    for key, on in labels.items():
        if on:
            raise DistrainError(f"{key}: acts on labels or on one view's pixels; ssl.method {s.method} trains on two "
                                "views without labels (set it in a later phase)")
    if cfg.transfer.mode != "full":
        raise DistrainError(f"transfer.mode: {cfg.transfer.mode} freezes the backbone that ssl.method {s.method} trains")
    if cfg.data.repeats != 1:
        raise DistrainError("data.repeats: ssl.method already makes two views of each sample; set it to 1")
    if cfg.data.policy != "none":
        raise DistrainError(f"data.policy: {cfg.data.policy} would be applied on top of the views' augmentation; "
                            "set it to none")


class _SelfSupervised:
    """What SimCLR and BYOL share: the backbone, the export and the kNN monitor; the
    loop's hooks as for :class:`distrain.engine.objective.Classification`.

    Args:
        cfg: The phase's config.
        num_classes: Classes of the labeled data (the kNN monitor's).
        bank_loader: A loader over the training shards with eval preprocessing (the kNN bank), or
            None without an eval set.
    """

    key_metric = "eval/knn_top1"

    def __init__(self, cfg: Config, num_classes: int, bank_loader=None):
        self.cfg, self.num_classes, self.bank_loader = cfg, num_classes, bank_loader
        self.fingerprint = ""
        self.load_report = None
        self.frozen_start: dict[str, torch.Tensor] = {}

    def _encoder(self) -> tuple[nn.Module, int]:
        """The configured network (pretrained weights loaded) without its classifier, and its width."""
        from distrain.models.pretrained import load_pretrained

        m = self.cfg.model
        net = build_model(self.cfg, self.num_classes)
        if m.pretrained:
            self.load_report = load_pretrained(net, m.pretrained, m.pretrained_ignore, m.reset_classifier)
        return strip_classifier(net)

    def build_model(self) -> nn.Module:
        encoder, width = self._encoder()
        return SSLModel(encoder, width, self.cfg.ssl.proj_hidden, self.cfg.ssl.proj_dim)

    def start_epoch(self, epoch: int, model: nn.Module, stream, to_device: ToDevice) -> dict[str, float]:
        return {}

    def targets_of(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def train_mode(self, wrapper: nn.Module, model: nn.Module, epoch: float) -> None:
        wrapper.train()

    def augment(self, images: torch.Tensor, targets: torch.Tensor, seed) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Nothing on the device: the views were made in the workers."""
        return images, targets, {}

    def export_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The backbone's weights under the network's names: what the next phase loads."""
        return backbone_weights(state)

    @torch.no_grad()
    def _features(self, encoder: nn.Module, loader, to_device: ToDevice, accelerator: Accelerator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised features and labels of every rank's share, gathered (padding rows dropped)."""
        feats, labels = [], []
        for _, images, y in prefetch_to_device(loader, to_device):
            feats.append(nn.functional.normalize(encoder(images).float(), dim=1))
            labels.append(y)
        # Every rank holds the same number of equal batches (the eval stream pads), so gather's
        # shapes agree.
        f = accelerator.gather(torch.cat(feats))
        y = accelerator.gather(torch.cat(labels))
        keep = y >= 0
        return f[keep], y[keep]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, to_device: ToDevice, accelerator: Accelerator) -> dict[str, float]:
        """``eval/knn_top1``: the kNN monitor's top-1 on the eval set, the same on every rank."""
        encoder = accelerator.unwrap_model(model).encoder
        was_training = encoder.training
        encoder.eval()
        bank, bank_labels = self._features(encoder, self.bank_loader, to_device, accelerator)
        mine, my_labels, skipped = [], [], 0
        for batch, images, y in prefetch_to_device(loader, to_device):
            mine.append(nn.functional.normalize(encoder(images).float(), dim=1))
            my_labels.append(y)
            skipped += len(batch["bad"])
        encoder.train(was_training)
        feats, labels = torch.cat(mine), torch.cat(my_labels)
        real = labels >= 0
        if bank.shape[0] == 0:
            raise DistrainError("ssl: the kNN monitor's bank is empty: the training shards hold no labeled sample")
        predicted = knn_predict(feats[real], bank, bank_labels, self.num_classes, self.cfg.ssl.knn_k,
                                self.cfg.ssl.knn_temperature)
        sums = torch.tensor([float((predicted == labels[real]).sum()), float(real.sum()), float(skipped)],
                            device=accelerator.device)
        hits, n, skipped = accelerator.reduce(sums, reduction="sum").tolist()
        return {"eval/knn_top1": 100 * hits / max(n, 1.0), "eval/samples": int(n), "eval/skipped": int(skipped)}

    def start_metrics(self, model: nn.Module, loader, to_device: ToDevice, accelerator: Accelerator
                      ) -> dict[str, float]:
        """The kNN monitor at the starting weights (at random init, the baseline pretraining must beat)."""
        if loader is None or not self.cfg.ssl.knn_at_start:
            return {}
        return self.evaluate(model, loader, to_device, accelerator)

    def window_metrics(self, micro_batches: int, accelerator: Accelerator) -> dict[str, float]:
        return {}

    def after_update(self, model: nn.Module, update: int, total_updates: int) -> None:
        """Nothing after an optimizer update (BYOL moves its target here)."""

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """No state besides the model's (BYOL: its target)."""
        return {}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Nothing to restore."""


class SimCLR(_SelfSupervised):
    """The objective of a SimCLR phase (see the module docstring)."""

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the two views (``images`` is view 0 of the batch, then view 1) over the global batch."""
        z1, z2 = model(images).float().chunk(2)
        return nt_xent(z1, z2, self.cfg.ssl.temperature, gather=True)


class _Branch(nn.Module):
    """An encoder and a projector held together (not copied): the names BYOL's target and its EMA use."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images))


class BYOLModel(SSLModel):
    """BYOL's online network: :class:`SSLModel` plus the predictor MLP (``dim -> pred_hidden -> dim``).

    ``forward`` returns the predictions; the export and the kNN monitor use ``encoder`` alone.
    """

    def __init__(self, encoder: nn.Module, features: int, hidden: int, dim: int, pred_hidden: int):
        super().__init__(encoder, features, hidden, dim)
        self.predictor = nn.Sequential(nn.Linear(dim, pred_hidden), nn.BatchNorm1d(pred_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(pred_hidden, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.encoder(images)))


def _without_running_stats(model: nn.Module) -> None:
    """Make every batch-norm layer of ``model`` normalise with batch statistics and keep none."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


class BYOL(_SelfSupervised):
    """The objective of a BYOL phase (Grill et al. 2020): an online network regresses, through a
    predictor, the target network's projection of the other view of the sample.

    **The online network** is the model the loop trains (:class:`BYOLModel`: encoder, projector,
    predictor): in the optimizer, wrapped in DDP or DeepSpeed. **The target** (encoder + projector)
    is this object's ``target``: a plain module replicated on every rank, never given to the
    optimizer or to ``accelerator.prepare``, its parameters without ``requires_grad``, its forward
    under ``torch.no_grad``. Its weights *are* the fp32 shadow of a distrain
    :class:`~distrain.tricks.ema.EMA` (the parameters share the shadow's storage), so the target
    update is the EMA's own fused foreach ``lerp``: after every optimizer update the loop calls
    :meth:`after_update`, which sets the EMA's decay to BYOL's cosine momentum
    ``tau = cosine_ema_momentum(ssl.target_momentum, update - 1, total_updates)`` (``tau`` at the
    first update is the base, rising to 1 over the phase's updates; the schedule's length is the
    phase's, whatever ``train.max_updates`` stops it at) and folds in the online encoder and
    projector: ``target = tau target + (1 - tau) online``. Parameters only: the update is a
    function of the online weights, which every rank holds identically (DDP, ZeRO-1/2), so every
    rank's target stays identical without communication. ZeRO-3 (each rank a slice of the online
    weights) is refused.

    **Batch norm**: the target runs in train mode, normalising with the batch's statistics as
    BYOL's reference code; it keeps no running statistics (nothing would read them). The kNN
    monitor and the export use the *online* encoder, in eval mode with its own running statistics
    (solo-learn's convention).

    **Loss**: symmetric, ``byol_loss(p1, z2) + byol_loss(p2, z1)`` (in ``[0, 8]``), ``p`` the
    online predictions and ``z`` the target projections of views 1 and 2. Both networks see the two
    views in one forward each, so their batch norm normalises the views together.

    **Checkpoints**: :meth:`state_dict` gives the target's weights, which the loop saves as the
    checkpoint's ``byol_target.safetensors`` and restores on resume (an exact continuation).

    Args:
        accelerator: The run's Accelerator: the target's device and autocast.
        Others: as :class:`SimCLR`.

    Raises:
        DistrainError: under DeepSpeed ZeRO-3.
    """

    STATE = "byol_target"
    """The checkpoint extra holding the target's weights."""

    def __init__(self, cfg: Config, num_classes: int, accelerator: Accelerator, bank_loader=None):
        super().__init__(cfg, num_classes, bank_loader)
        ds = accelerator.state.deepspeed_plugin
        if ds is not None and ds.zero_stage == 3:
            raise DistrainError(ZERO3_REFUSAL)
        self.accelerator = accelerator
        self.target: nn.Module | None = None
        self.ema: EMA | None = None
        self._online: _Branch | None = None

    def build_model(self) -> nn.Module:
        """The online network; the target starts as its copy (encoder and projector), in fp32 on the device."""
        encoder, width = self._encoder()
        s = self.cfg.ssl
        online = BYOLModel(encoder, width, s.proj_hidden, s.proj_dim, s.pred_hidden)
        target = copy.deepcopy(_Branch(online.encoder, online.projector))
        _without_running_stats(target)
        target = target.float().to(self.accelerator.device).requires_grad_(False).train()
        self.ema = EMA(target, s.target_momentum, buffers=False)
        for name in dict(target.named_parameters()):  # the target's weights become the shadow itself
            owner, _, leaf = name.rpartition(".")
            target.get_submodule(owner)._parameters[leaf] = nn.Parameter(self.ema.shadow[name], requires_grad=False)
        self.target = target
        return online

    def _target_autocast(self):
        """The online network's precision for the target's forward: Accelerate's autocast under DDP;
        under DeepSpeed 16-bit (no autocast: the online weights are cast), autocast to that dtype."""
        dtype = input_dtype(self.accelerator)
        if dtype != torch.float32:
            return torch.autocast(self.accelerator.device.type, dtype=dtype)
        return self.accelerator.autocast()

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``byol_loss(p1, z2) + byol_loss(p2, z1)`` (``images``: view 1 of the batch, then view 2)."""
        p1, p2 = model(images).float().chunk(2)
        with torch.no_grad(), self._target_autocast():
            z1, z2 = self.target(images).float().chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def momentum(self, update: int, total_updates: int) -> float:
        """The target momentum of the update made after optimizer update ``update`` (1-based)."""
        return cosine_ema_momentum(self.cfg.ssl.target_momentum, update - 1, total_updates)

    def after_update(self, model: nn.Module, update: int, total_updates: int) -> None:
        """Move the target towards the online encoder and projector (``model``: the unwrapped online network)."""
        if self._online is None or self._online.encoder is not model.encoder:
            self._online = _Branch(model.encoder, model.projector)
        self.ema.decay = self.momentum(update, total_updates)
        self.ema.update(self._online, update)

    def window_metrics(self, micro_batches: int, accelerator: Accelerator) -> dict[str, float]:
        return {"train/target_momentum": self.ema.decay}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The target's weights (live tensors), under the online network's names."""
        return {self.STATE: dict(self.ema.shadow)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`state_dict` output into the target, in place."""
        self.ema.load_state_dict({"shadow": state[self.STATE], "n_updates": self.ema.n_updates})


ZERO3_REFUSAL = ("distributed.zero_stage: 3 partitions the online weights across ranks, and ssl.method byol's "
                 "target is updated from the whole weights on every rank; use ZeRO stage 1 or 2, or ddp")


def ssl_views(cfg: Config) -> ViewAugment | None:
    """The colour augmentation of the views of a self-supervised phase (None without one).

    SimCLR: blur ``ssl.blur_prob`` on both views. BYOL's views are asymmetric: blur ``blur_prob``
    on view 1 and a tenth of it on view 2 (BYOL: 1.0 and 0.1), solarisation on view 2 only.
    ``ssl.solarize_prob`` (view 2's) defaults to 0.2 under byol, 0 under simclr.
    """
    s = cfg.ssl
    if s.method == "none":
        return None
    byol = s.method == "byol"
    solarize = s.solarize_prob if s.solarize_prob is not None else (0.2 if byol else 0.0)
    blur = (s.blur_prob, s.blur_prob / 10) if byol else (s.blur_prob,)
    return ViewAugment(s.color_strength, blur_p=blur, solarize_p=(0.0, solarize))
