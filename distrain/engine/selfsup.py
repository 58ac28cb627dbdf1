"""Self-supervised pretraining as a phase objective: SimCLR with negatives from every rank, and a
kNN monitor that counts every sample once.

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

import torch
from accelerate import Accelerator
from torch import nn

from distrain.config import Config
from distrain.data.device import ToDevice, prefetch_to_device
from distrain.engine.build import build_model
from distrain.errors import DistrainError
from distrain.models.pretrained import classifier_names
from distrain.tricks.ssl import knn_predict, nt_xent

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
            on, or out-of-range SSL values.
    """
    s = cfg.ssl
    if s.method == "none":
        return
    for key, v in (("ssl.temperature", s.temperature), ("ssl.proj_hidden", s.proj_hidden), ("ssl.proj_dim", s.proj_dim),
                   ("ssl.knn_k", s.knn_k), ("ssl.knn_temperature", s.knn_temperature)):
        if v <= 0:
            raise DistrainError(f"{key}: must be > 0, got {v}")
    if not 0 <= s.blur_prob <= 1:
        raise DistrainError(f"ssl.blur_prob: a probability in [0, 1], got {s.blur_prob}")
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
        raise DistrainError(f"data.policy: {cfg.data.policy} would be applied on top of SimCLR's view augmentation; "
                            "set it to none")


class SimCLR:
    """The objective of a SimCLR phase (see the module docstring); the loop's hooks as for
    :class:`distrain.engine.objective.Classification`.

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

    def build_model(self) -> nn.Module:
        from distrain.models.pretrained import load_pretrained

        m = self.cfg.model
        net = build_model(self.cfg, self.num_classes)
        if m.pretrained:
            self.load_report = load_pretrained(net, m.pretrained, m.pretrained_ignore, m.reset_classifier)
        encoder, width = strip_classifier(net)
        return SSLModel(encoder, width, self.cfg.ssl.proj_hidden, self.cfg.ssl.proj_dim)

    def train_mode(self, wrapper: nn.Module, model: nn.Module, epoch: float) -> None:
        wrapper.train()

    def augment(self, images: torch.Tensor, targets: torch.Tensor, seed) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Nothing on the device: the views were made in the workers."""
        return images, targets, {}

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the two views (``images`` is view 0 of the batch, then view 1) over the global batch."""
        z1, z2 = model(images).float().chunk(2)
        return nt_xent(z1, z2, self.cfg.ssl.temperature, gather=True)

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
