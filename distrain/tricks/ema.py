"""Exponential moving average (Polyak averaging) of a model's weights.

The loop calls :meth:`EMA.update` after every optimizer update; every ``every`` updates the fp32
shadow moves towards the live weights. Evaluate the average with :meth:`EMA.swapped` (no second
model copy) and save it with :meth:`EMA.state_dict`. Recipes: torchvision's SOTA recipe (EMA every
32 steps, decay 0.99998 adjusted for the step gap) and timm's ``ModelEmaV2``/``V3`` (decay warmup).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn


def ema_decay(decay: float, every: int, n_updates_done: int, warmup: bool) -> float:
    """The decay of the next EMA update.

    An EMA update made every ``every`` optimizer updates stands in for ``every`` per-update steps,
    so it decays by ``decay ** every``: after ``U`` optimizer updates the old average keeps weight
    ``decay ** U`` whatever ``every`` is, and the averaging horizon stays ``~1 / (1 - decay)``
    optimizer updates. With ``warmup`` the decay is capped at ``(1 + n) / (10 + n)`` (timm's and
    TensorFlow's rule, ``n`` = EMA updates already made), so the average forgets the random
    initialisation quickly early on instead of dragging it along for the whole horizon.

    Args:
        decay: Per-optimizer-update decay in ``[0, 1)``.
        every: Optimizer updates between two EMA updates.
        n_updates_done: EMA updates made before this one.
        warmup: Whether to apply the warmup cap.

    Returns:
        The factor the average is multiplied by; the live weights get ``1 - decay``.
    """
    effective = decay**every
    if warmup:
        return min(effective, (1 + n_updates_done) / (10 + n_updates_done))
    return effective


def _named_tensors(model: nn.Module, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Parameters and (with ``buffers``) buffers by name; buffers carry BN running stats, which must
    follow the weights.

    Under DeepSpeed ZeRO-3 a parameter's own data is empty between forwards and the rank holds a
    slice of it in ``ds_tensor``: the average is then kept of that slice, so each rank averages
    what it owns, no update gathers anything, and swapping the slices in makes the next forward
    gather the averaged weights. Small parameters that ZeRO-3 keeps whole on every rank
    (``ds_persist``) are averaged whole, as forwards read them directly.
    """
    tensors = {name: p.ds_tensor if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False) else p
               for name, p in model.named_parameters()}
    if buffers:
        tensors.update(model.named_buffers())
    return tensors


class EMA:
    """A shadow copy of a model's parameters and buffers, averaged over optimizer updates.

    Floating-point tensors are averaged in at least fp32 (a bf16 model keeps an fp32 shadow: a
    bf16 average would round away updates of ``1 - decay`` relative size); integer buffers such as
    ``num_batches_tracked`` are copied. The shadow lives on each tensor's device, so build the EMA
    after the model has been moved there. The model's tensors must be updated in place (as
    optimizers and BatchNorm do), since they are gathered once per model object.

    Args:
        model: The unwrapped module (not the DDP/compiled wrapper).
        decay: Per-optimizer-update decay in ``[0, 1)``; see :func:`ema_decay`.
        every: Update the average every this many optimizer updates.
        warmup: Cap the decay early in training; see :func:`ema_decay`.
        buffers: Also average the buffers; False: the parameters only (BYOL's target network, whose
            batch norm uses batch statistics and keeps none).

    The decay may be set between updates (``ema.decay = tau``): BYOL's target sets its scheduled
    momentum before each update (:class:`distrain.engine.selfsup.BYOL`).
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False,
                 buffers: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.decay = decay
        self.every = every
        self.warmup = warmup
        self.n_updates = 0
        self._with_buffers = buffers
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: t.detach().to(dtype=torch.promote_types(t.dtype, torch.float32), copy=True)
                if t.is_floating_point()
                else t.detach().clone()
                for name, t in _named_tensors(model, buffers).items()
            }
        self._buffer_names = [name for name, _ in model.named_buffers()] if buffers else []
        self._bound: weakref.ref[nn.Module] | None = None
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        """Pair the shadow with ``model``'s tensors in foreach-ready lists, split by how they combine."""
        if self._bound is not None and self._bound() is model:
            return
        tensors = _named_tensors(model, self._with_buffers)
        if tensors.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - tensors.keys(), tensors.keys() - self.shadow.keys()
            raise ValueError(f"model does not match the EMA: missing {sorted(missing)}, extra {sorted(extra)}")
        names = list(self.shadow)
        self._all_shadow = [self.shadow[n] for n in names]
        self._all_model = [tensors[n] for n in names]
        # lerp needs equal dtypes; bf16/fp16 weights take the promoting mul+add path instead.
        same = [n for n in names if tensors[n].is_floating_point() and tensors[n].dtype == self.shadow[n].dtype]
        cast = [n for n in names if tensors[n].is_floating_point() and tensors[n].dtype != self.shadow[n].dtype]
        ints = [n for n in names if not tensors[n].is_floating_point()]
        self._same = ([self.shadow[n] for n in same], [tensors[n] for n in same])
        self._cast = ([self.shadow[n] for n in cast], [tensors[n] for n in cast])
        self._ints = ([self.shadow[n] for n in ints], [tensors[n] for n in ints])
        self._bound = weakref.ref(model)

    @torch.no_grad()
    def update(self, model: nn.Module, update: int) -> None:
        """Fold ``model``'s current weights into the average if ``update`` is a multiple of ``every``.

        Args:
            model: The module the EMA was built from (or one with the same names).
            update: The 1-based count of optimizer updates made so far.
        """
        if update % self.every:
            return
        self._bind(model)
        decay = ema_decay(self.decay, self.every, self.n_updates, self.warmup)
        if self._same[0]:
            torch._foreach_lerp_(self._same[0], self._same[1], 1.0 - decay)
        if self._cast[0]:
            torch._foreach_mul_(self._cast[0], decay)
            torch._foreach_add_(self._cast[0], self._cast[1], alpha=1.0 - decay)
        if self._ints[0]:
            torch._foreach_copy_(self._ints[0], self._ints[1])
        self.n_updates += 1

    def buffers(self) -> list[torch.Tensor]:
        """The shadow's buffers (averaged BN statistics, counters): the part that is not replicated by
        construction, since each rank averages the buffers its own batches produced."""
        return [self.shadow[name] for name in self._buffer_names]

    def state_dict(self) -> dict:
        """The shadow tensors (live, not copies, like :meth:`nn.Module.state_dict`) and the counter."""
        return {"shadow": dict(self.shadow), "n_updates": self.n_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output in place, keeping the shadow's devices and dtypes."""
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - shadow.keys(), shadow.keys() - self.shadow.keys()
            raise ValueError(f"EMA state does not match: missing {sorted(missing)}, extra {sorted(extra)}")
        for name, t in self.shadow.items():
            t.copy_(shadow[name])
        self.n_updates = int(state["n_updates"])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the average, cast to their dtypes."""
        self._bind(model)
        torch._foreach_copy_(self._all_model, self._all_shadow)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the average into ``model`` for the ``with`` block, then restore its own weights exactly.

        Costs one copy of the model's tensors (in their own dtypes) instead of a second model. The
        restore also undoes anything the block did to the weights, such as BN stats updated in train
        mode.

        Yields:
            ``model``, now holding the averaged weights.
        """
        self._bind(model)
        with torch.no_grad():
            backup = [t.detach().clone() for t in self._all_model]
            torch._foreach_copy_(self._all_model, self._all_shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._all_model, backup)
