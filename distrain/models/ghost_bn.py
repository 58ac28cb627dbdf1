"""Ghost batch normalisation (Hoffer et al. 2017, "Train longer, generalize better").

Large-batch training keeps BN statistics per small group of samples rather than per (micro-)batch:
Goyal et al. 2017 normalise over 32 samples whatever the total batch, because the noise of small-batch
statistics regularises and the normalisation should not change when the batch is scaled up.
:class:`GhostBatchNorm2d` splits each training batch into consecutive virtual ("ghost") batches of
``ghost_size`` samples and normalises each with its own statistics; :func:`convert_to_ghost_bn`
swaps it into an existing model without changing its ``state_dict``.

Running statistics: one EMA step per forward (with the module's ``momentum``, or the cumulative
average when ``momentum`` is None), exactly like :class:`torch.nn.BatchNorm2d`, where the batch
statistic fed to the EMA is the average over the ghost groups of their mean and of their unbiased
variance. With equal-sized groups the average of the group means *is* the full-batch mean, and each
group's unbiased variance is an unbiased estimate of the per-channel variance, so their average
estimates the same quantity as BN's unbiased full-batch variance (the spread between group means is
not lost: that is what the unbiasing corrects for). The running statistics therefore estimate the
same population statistics, with the same time constant in forwards, as plain BN on the full batch,
and checkpoints, eval mode and momentum settings keep their meaning. Taking one EMA step per ghost
group instead would make the statistics forget faster as the batch grows, tying the effective
momentum to ``batch / ghost_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distrain.errors import DistrainError

# Dimension orders that list a tensor's dimensions from outermost to innermost in memory.
_NCHW = (0, 1, 2, 3)
_NHWC = (0, 2, 3, 1)
_NHWC_INVERSE = (0, 3, 1, 2)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics come from virtual batches of ``ghost_size`` samples.

    In training mode a batch of ``n`` samples (``n`` a multiple of ``ghost_size``) is split along
    dim 0 into ``n // ghost_size`` consecutive groups; each is normalised with its own mean and biased
    variance, then the shared affine ``weight``/``bias`` is applied. This equals running a fresh
    BatchNorm2d (same affine parameters) on each group and concatenating the results. A batch of at
    most ``ghost_size`` samples, and eval mode with running statistics, behave exactly like
    BatchNorm2d. Without running statistics (``track_running_stats=False``) eval mode also uses ghost
    statistics, as BatchNorm2d would use batch statistics there.

    Running statistics get one update per forward, like BatchNorm2d, from the average over the groups
    of their means and unbiased variances (see the module docstring for why this matches BN over the
    full batch). ``momentum=None`` gives the cumulative average over forwards, as in BatchNorm2d.

    The state_dict is BatchNorm2d's, so checkpoints move freely between the two.

    Args:
        num_features: Channels ``C`` of the ``(N, C, H, W)`` input.
        ghost_size: Samples per virtual batch.
        eps: Added to the variance for numerical stability.
        momentum: EMA factor for the running statistics, or None for a cumulative average.
        affine: Learn a per-channel scale and shift.
        track_running_stats: Keep running statistics for eval mode.
        device: Device of the parameters and buffers.
        dtype: Dtype of the parameters and buffers.

    Raises:
        ValueError: ``ghost_size`` is not positive.
    """

    def __init__(
        self,
        num_features: int,
        ghost_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        if ghost_size <= 0:
            raise ValueError(f"ghost_size must be positive, got {ghost_size}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_size = ghost_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` of shape ``(N, C, H, W)``.

        Raises:
            DistrainError: In a mode that uses batch statistics, ``N`` exceeds ``ghost_size`` and is
                not a multiple of it.
        """
        self._check_input_dim(input)
        n = input.shape[0]
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_stats or n <= self.ghost_size:
            return super().forward(input)
        if n % self.ghost_size:
            raise DistrainError(
                f"model.ghost_batch_size: the micro-batch of {n} samples is not a multiple of the ghost "
                f"batch size {self.ghost_size}; make the per-device micro-batch a multiple of it"
            )
        n_ghost = n // self.ghost_size
        # Folding the ghost index into the channel dimension turns per-group statistics into
        # per-channel ones, so one fused F.batch_norm call does the work. Working in the input's own
        # memory order keeps channels_last tensors channels_last with one copy in and one out.
        channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
        order, inverse = (_NHWC, _NHWC_INVERSE) if channels_last else (_NCHW, _NCHW)
        channel_axis = order.index(1)
        folded = (
            input.permute(order)
            .unflatten(0, (n_ghost, self.ghost_size))
            .movedim(0, channel_axis)
            .flatten(channel_axis, channel_axis + 1)
            .permute(inverse)
        )

        update = self.training and self.track_running_stats
        if update:
            # With momentum 1 F.batch_norm overwrites these with each group's mean and unbiased
            # variance, which the fused kernel computes anyway; no second pass over the input.
            group_mean = self.running_mean.new_zeros(n_ghost * self.num_features)
            group_var = self.running_var.new_ones(n_ghost * self.num_features)
        else:
            group_mean = group_var = None
        out = F.batch_norm(
            folded,
            group_mean,
            group_var,
            None if self.weight is None else self.weight.repeat(n_ghost),
            None if self.bias is None else self.bias.repeat(n_ghost),
            training=True,
            momentum=1.0,
            eps=self.eps,
        )
        if update:
            self._update_running_stats(group_mean.view(n_ghost, -1).mean(0), group_var.view(n_ghost, -1).mean(0))

        return (
            out.permute(order)
            .unflatten(channel_axis, (n_ghost, self.num_features))
            .movedim(channel_axis, 0)
            .flatten(0, 1)
            .permute(inverse)
        )

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        # The same EMA step, and the same momentum=None cumulative average, as BatchNorm2d.forward.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(var, factor)


def _ghost_from(bn: nn.BatchNorm2d, ghost_size: int) -> GhostBatchNorm2d:
    ghost = GhostBatchNorm2d(
        bn.num_features, ghost_size, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta"
    )
    # Reusing the very tensors keeps an optimizer built before the conversion, and any tied
    # references, pointing at the live parameters. Copying None too carries over BN variants
    # without a bias (torch's keyword-only ``bias=False``) or without running statistics.
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(ghost, name, getattr(bn, name))
    return ghost.train(bn.training)


def convert_to_ghost_bn(model: nn.Module, ghost_size: int) -> nn.Module:
    """Replace, in place, every ``nn.BatchNorm2d`` of ``model`` by an equivalent GhostBatchNorm2d.

    The new modules share the old ones' parameters and buffers (weight, bias, running statistics,
    ``num_batches_tracked``) and copy eps, momentum, affine, track_running_stats and train/eval mode,
    so the ``state_dict`` is unchanged. Only modules of exactly type ``nn.BatchNorm2d`` are converted:
    SyncBatchNorm, existing ghost modules and other subclasses (whose forward may differ) are left
    alone. A module reached under several names is replaced by one shared ghost module.

    Args:
        model: The network; modified in place.
        ghost_size: Samples per virtual batch.

    Returns:
        ``model``, or the replacement when ``model`` itself is an ``nn.BatchNorm2d``.

    Raises:
        ValueError: ``ghost_size`` is not positive.
    """
    if ghost_size <= 0:
        raise ValueError(f"ghost_size must be positive, got {ghost_size}")
    if type(model) is nn.BatchNorm2d:
        return _ghost_from(model, ghost_size)
    replaced: dict[int, GhostBatchNorm2d] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                if id(child) not in replaced:
                    replaced[id(child)] = _ghost_from(child, ghost_size)
                setattr(parent, name, replaced[id(child)])
    return model
