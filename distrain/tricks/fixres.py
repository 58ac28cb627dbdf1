"""FixRes fine-tuning (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").

A model trained on RandomResizedCrop sees objects larger than at test time. After the main
schedule, a short phase at the test resolution with test-time preprocessing fixes the
discrepancy: only the classifier and the norm layer before pooling learn (the paper's choice),
and that layer's BN statistics adapt to the test-time distribution. Everything else is frozen,
including the running statistics of the other BN layers, which stay in eval mode.
"""

from __future__ import annotations

from torch import nn

from distrain.config import Config, from_dict, to_dict
from distrain.errors import DistrainError

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def fixres_config(cfg: Config) -> Config:
    """The config of the FixRes phase of ``cfg``: its own run dir, LR and epochs, test-time crops.

    Per-sample and per-batch augmentation, repeated augmentation, progressive resizing and EMA
    are off; the batch, optimizer and label smoothing are the main run's.
    """
    d = to_dict(cfg)
    d["run_dir"] = str(cfg.out_dir / "fixres")
    d["data"].update(train_crop=cfg.data.eval_crop, train_resize=cfg.data.eval_resize, policy="none",
                     random_erasing=0.0, repeats=1)
    d["mix"].update(mixup_alpha=0.0, cutmix_alpha=0.0)
    d["ema"].update(decay=0.0, export=False)
    d["progressive"]["start_size"] = 0
    d["optim"]["lr"] = cfg.fixres.lr
    d["schedule"].update(epochs=cfg.fixres.epochs, warmup_epochs=0.0, warmup_updates=0, warmup_start_lr=None,
                         decay="cosine", final_lr_factor=0.0)
    d["train"]["max_updates"] = 0
    return from_dict(d)


def freeze_for_fixres(model: nn.Module, adapt: str) -> list[nn.Module]:
    """Freeze every parameter except the classifier's (the last ``nn.Linear``) and the adapted norm layers'.

    Args:
        model: The unwrapped model.
        adapt: ``"last"``: the last norm layer in module order (the one before pooling in ResNets);
            ``"stats"``: that layer re-estimates its statistics but its affine parameters stay
            frozen (the official FixRes code); ``"all"``: every norm layer.

    Returns:
        The adapted norm layers, which alone stay in training mode (see :func:`fixres_train_mode`).

    Raises:
        DistrainError: the model has no ``nn.Linear`` classifier.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DistrainError(f"fixres.epochs: {type(model).__name__} has no nn.Linear classifier to fine-tune")
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    adapted = norms if adapt == "all" else norms[-1:]
    model.requires_grad_(False)
    for module in [linears[-1], *(adapted if adapt != "stats" else [])]:
        module.requires_grad_(True)
    return adapted


def fixres_train_mode(wrapper: nn.Module, model: nn.Module, adapted: list[nn.Module]) -> None:
    """Training mode for the FixRes phase: the adapted norm layers train, all other layers (and
    their BN statistics, dropout, stochastic depth) behave as at test time.

    Args:
        wrapper: The prepared (e.g. DDP-wrapped) model, which stays in training mode.
        model: The unwrapped model inside it.
        adapted: What :func:`freeze_for_fixres` returned.
    """
    wrapper.train()
    keep = {id(m) for m in adapted}
    for module in model.modules():  # not .eval(): it recurses, and would reach the adapted layers
        module.training = id(module) in keep
