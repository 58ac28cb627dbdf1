"""Weight initialisation schemes (``model.init``) for the conv and linear layers of a fresh model.

:func:`init_weights` runs on the plain PyTorch model that :func:`distrain.engine.build.build_model`
returns, before ``accelerator.prepare``. distrain never builds a model inside ``deepspeed.zero.Init``,
so even under ZeRO-3 every parameter is whole and real here, and every rank draws the same values
from the same seed; DeepSpeed partitions the initialised weights when the model is prepared. A
ZeRO-3 parameter (an empty placeholder whose data lives in partitions) is refused rather than
silently "initialised", so a change of that order cannot go unnoticed.
"""

from __future__ import annotations

import torch
from torch import nn

from distrain.errors import DistrainError

SCHEMES = ("default", "he", "xavier", "orthogonal", "trunc_normal")
_DEFAULT_GAIN = {"xavier": 1.0, "orthogonal": 1.0, "trunc_normal": 0.02}
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def refuse_zero3_placeholders(model: nn.Module, key: str) -> None:
    """Raise unless every parameter of ``model`` holds its real, whole data.

    A parameter that ZeRO-3 manages (``ds_id``/``ds_numel``) is an empty placeholder outside a
    gather; writing to it would change nothing that trains.

    Args:
        model: The model about to be initialised or loaded.
        key: The config key that asked for it, the start of the message.

    Raises:
        DistrainError: a parameter is a ZeRO-3 placeholder.
    """
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            raise DistrainError(
                f"{key}: parameter {name} is a DeepSpeed ZeRO-3 placeholder ({p.numel()} of "
                f"{getattr(p, 'ds_numel', '?')} values here), not the real weight: it must be set before "
                "accelerator.prepare, on the model built outside deepspeed.zero.Init"
            )


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str, gain: float | None = None) -> None:
    """Re-initialise the weight of every Conv1d/2d/3d and Linear layer of ``model``, in place.

    Biases are zeroed; norm layers, embeddings and parameters outside those layers (e.g.
    ``nn.MultiheadAttention.in_proj_weight``, ViT position embeddings and class tokens) keep the
    model's own init. Call it on the plain model before ``accelerator.prepare`` (see the module
    docstring on ZeRO-3), and before loading pretrained weights, which then replace it where they
    apply. ``model.zero_init_residual`` survives it, being a norm-layer setting.

    Schemes (``fan_in`` = input channels / groups x kernel size, ``fan_out`` likewise):

    - ``default``: nothing changes. PyTorch's own layer default, ``kaiming_uniform_(a=sqrt(5))``, is
      *not* He init: its variance is ``1 / (3 fan_in)``, a sixth of He's ``2 / fan_in``.
    - ``he``: He et al. 2015, ``N(0, 2 / fan_in)``: ``kaiming_normal_(mode="fan_in",
      nonlinearity="relu")``, the paper's forward-pass form, which keeps activation variance through
      ReLU layers (torchvision's ResNets use ``fan_out``, which preserves gradient variance instead;
      the two differ by the layer's channel ratio). Its gain is ReLU's, sqrt 2.
    - ``xavier``: Glorot & Bengio 2010, ``N(0, gain^2 * 2 / (fan_in + fan_out))`` (``xavier_normal_``).
    - ``orthogonal``: Saxe et al. 2014: the weight, flattened to ``(out, fan_in)``, is ``gain`` times
      a (semi-)orthogonal matrix: ``W W^T = gain^2 I`` when ``out <= fan_in``, else ``W^T W = gain^2 I``.
    - ``trunc_normal``: ``N(0, std^2)`` with ``std = gain`` (0.02 by default, as ViT/DeiT), redrawn
      outside +-2 std (so the actual std is 0.88 std). timm's ViT calls ``trunc_normal_(std=.02)``
      with absolute bounds +-2, which at that std truncate nothing; +-2 std is the JAX/big_vision one.

    Args:
        model: The freshly built model.
        scheme: ``model.init``: one of :data:`SCHEMES`.
        gain: ``model.init_gain``: gain of ``xavier``/``orthogonal``, std of ``trunc_normal``; None
            takes the scheme's usual value (1, 1, 0.02).

    Raises:
        DistrainError: an unknown scheme, a gain for a scheme that takes none or a gain <= 0, or a
            ZeRO-3 placeholder parameter.
    """
    if scheme not in SCHEMES:
        raise DistrainError(f"model.init: unknown scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    if gain is not None and scheme not in _DEFAULT_GAIN:
        why = "takes its gain from ReLU (sqrt 2)" if scheme == "he" else "changes nothing"
        raise DistrainError(f"model.init_gain: {gain} is set but model.init={scheme} {why}; leave it unset")
    if gain is not None and not gain > 0:
        raise DistrainError(f"model.init_gain: {gain} must be > 0")
    if scheme == "default":
        return
    refuse_zero3_placeholders(model, "model.init")
    gain = _DEFAULT_GAIN.get(scheme) if gain is None else gain
    for module in model.modules():
        if not isinstance(module, _LAYERS):
            continue
        w = module.weight
        if scheme == "he":
            nn.init.kaiming_normal_(w, a=0.0, mode="fan_in", nonlinearity="relu")
        elif scheme == "xavier":
            nn.init.xavier_normal_(w, gain=gain)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(w, gain=gain)  # flattens to (out, in/groups * kernel) itself
        else:
            nn.init.trunc_normal_(w, std=gain, a=-2 * gain, b=2 * gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

